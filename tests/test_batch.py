"""``blipserve batch`` in process: inputs, outputs, error thresholds, retries, resume checks."""

from __future__ import annotations

import base64
import csv
import dataclasses
import http.server
import json
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from blipserve.batch import runner
from blipserve.batch.job import BatchSpec, make_plan, manifest, resolve_params
from blipserve.batch.main import EXIT_THRESHOLD, main
from blipserve.batch.progress import Progress, Result, ResumeConflict
from blipserve.batch.sinks import write_output
from blipserve.batch.sources import InputError, discover, read_chunk, scan_chunks
from tests.batch_inputs import jpeg_bytes, mixed_folder, write_azure_sample_csv, write_jsonl

GEN = {"max_new_tokens": 6}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos) -> Path:
    return mixed_folder(tmp_path_factory.mktemp("inputs"), photos)


def spec_for(checkpoint, input_path, output_dir, **kw) -> BatchSpec:
    options = dict(model=str(checkpoint), device="cpu", dtype="float32", gen=GEN, threads=2)
    return BatchSpec(input=str(input_path), output_dir=str(output_dir), **{**options, **kw})


def model_args(checkpoint) -> list[str]:
    return ["--model", str(checkpoint), "--device", "cpu", "--dtype", "float32", "--no-progress"]


# -- sources -----------------------------------------------------------------------------------


def all_rows(spec: BatchSpec) -> list[tuple[str, int, object, str | None, str | None]]:
    plan = make_plan(spec)
    return [
        (plan.names[c.position(i)[0]], r.row, r.image, r.prompt, r.error)
        for c in plan.chunks
        for i, r in enumerate(read_chunk(plan.files, c))
    ]


def test_discover_sorts_and_recurses_on_request(folder):
    flat = [p.name for p in discover(folder)]
    assert flat == ["azure.csv", "cat.png", "coffee.jpg", "table.parquet", "vqa.jsonl"]
    deep = [p.relative_to(folder).as_posix() for p in discover(folder, recursive=True)]
    assert deep[-1] == "vqa.jsonl" and "sub/astronaut.webp" in deep
    with pytest.raises(InputError, match="no such file"):
        discover(folder / "nope")


def test_every_input_type_yields_its_rows(folder, tmp_path):
    rows = all_rows(BatchSpec(input=str(folder), output_dir=str(tmp_path), recursive=True))
    by_file: dict[str, list] = {}
    for name, *rest in rows:
        by_file.setdefault(name, []).append(rest)
    assert [r[0] for r in by_file["azure.csv"]] == [0, 1, 2, 3, 4]
    assert "\n" in by_file["azure.csv"][0][1]  # MIME base64 kept its line breaks
    assert by_file["cat.png"] == [[0, folder / "cat.png", None, None]]
    assert by_file["sub/astronaut.webp"][0][1] == folder / "sub" / "astronaut.webp"
    vqa = by_file["vqa.jsonl"]
    assert vqa[0][1] == folder / "cat.png"  # a path relative to the table
    assert vqa[0][2] == "Question: what animal is it? Answer:"
    assert vqa[2][1] == "missing.png"  # not found next to the table: left to the loader
    table = by_file["table.parquet"]
    assert [r[2] for r in table] == ["a", None, None, "c, d"]
    assert table[2][3] == "empty image value" and isinstance(table[0][1], bytes)


def test_chunks_start_mid_file_at_their_offsets(tmp_path, photos):
    data = [jpeg_bytes(photos["chelsea"], (20 + i, 20)) for i in range(7)]
    write_azure_sample_csv(
        tmp_path / "a.csv", data, prompts=[f'say "{i}",\nthen' for i in range(7)]
    )
    files = [tmp_path / "a.csv"]
    whole = list(read_chunk(files, scan_chunks(files[0], 0, 100, None)[0]))
    chunks = scan_chunks(files[0], 0, 3, None)
    assert [(c.first_row, c.n_rows) for c in chunks] == [(0, 3), (3, 3), (6, 1)]
    pieces = [r for c in chunks for r in read_chunk(files, c)]
    assert pieces == whole and len(whole) == 7
    assert base64.b64decode(whole[4].image) == data[4] and whole[4].prompt == 'say "4",\nthen'
    assert [c.n_rows for c in scan_chunks(tmp_path / "a.csv", 0, 3, 5)] == [3, 2]


def test_consecutive_image_files_share_chunks(tmp_path, photos):
    """A folder of photos is cut into chunks of ``chunk_size`` files, not one per file,
    so batches fill up; a table in between starts a chunk of its own."""
    for name in ("a", "b", "c", "e", "f", "g", "h"):
        (tmp_path / f"{name}.jpg").write_bytes(jpeg_bytes(photos["coffee"], (24, 24)))
    write_jsonl(tmp_path / "d.jsonl", [{"image": "a.jpg"}, {"image": "b.jpg"}])
    spec = BatchSpec(input=str(tmp_path), output_dir=str(tmp_path / "out"), chunk_size=3)
    plan = make_plan(spec)
    spans = [[plan.names[c.position(i)[0]] for i in range(c.n_rows)] for c in plan.chunks]
    assert spans == [
        ["a.jpg", "b.jpg", "c.jpg"],
        ["d.jsonl", "d.jsonl"],
        ["e.jpg", "f.jpg", "g.jpg"],
        ["h.jpg"],
    ]
    assert len({c.name for c in plan.chunks}) == 4  # one part file each
    rows = [(name, row, image) for name, row, image, *_ in all_rows(spec)]
    assert rows[:3] == [
        ("a.jpg", 0, tmp_path / "a.jpg"),
        ("b.jpg", 0, tmp_path / "b.jpg"),
        ("c.jpg", 0, tmp_path / "c.jpg"),
    ]
    assert rows[3][:2] == ("d.jsonl", 0) and rows[4][:2] == ("d.jsonl", 1)
    limited = make_plan(dataclasses.replace(spec, limit=6))
    assert [c.n_rows for c in limited.chunks] == [3, 2, 1] and limited.rows == 6


def test_image_folder_runs_full_batches(tiny_checkpoint, tmp_path, photos, monkeypatch):
    """Throughput: 10 photos with --batch-size 4 are 3 model calls (4, 4, 2), not 10."""
    from blipserve.batch.local import ChunkProcessor

    for i in range(10):
        (tmp_path / f"{i:02d}.jpg").write_bytes(jpeg_bytes(photos["astronaut"], (30 + i, 30)))
    sizes: list[int] = []
    original = ChunkProcessor.generate

    def counted(self, rows):
        sizes.append(len(rows))
        return original(self, rows)

    monkeypatch.setattr(ChunkProcessor, "generate", counted)
    summary = runner.run(
        spec_for(tiny_checkpoint, tmp_path, tmp_path / "out", batch_size=4), progress_bar=False
    )
    assert summary.done == 10 and summary.failed == 0
    assert sizes == [4, 4, 2]
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        records = list(csv.reader(f))
    assert [(r[0], r[2]) for r in records] == [("0", f"{i:02d}.jpg") for i in range(10)]


def test_table_without_image_column_is_refused(tmp_path):
    (tmp_path / "t.csv").write_text(",picture\n0,abc\n")
    with pytest.raises(InputError, match="no 'image' column"):
        make_plan(BatchSpec(input=str(tmp_path), output_dir=str(tmp_path / "out")))


# -- outputs -----------------------------------------------------------------------------------


RESULTS = [
    Result("a.csv", 0, "a cat, sitting"),
    Result("a.csv", 1, None, "not an image"),
    Result("a.csv", 2, 'she said "hi"\nand left'),
    Result("b.png", 0, "plain"),
]


def test_azure_csv_bytes(tmp_path):
    write_output("azure-csv", tmp_path, RESULTS, {"model": "m", "params": {}})
    assert (tmp_path / "predictions.csv").read_bytes() == (
        b'0,"a cat, sitting",a.csv\n2,"she said ""hi""\nand left",a.csv\n0,plain,b.png\n'
    )
    assert (tmp_path / "errors.jsonl").read_bytes() == (
        b'{"file": "a.csv", "row": 1, "error": "not an image"}\n'
    )


def test_jsonl_and_parquet_bytes_and_columns(tmp_path):
    import pyarrow.parquet as pq

    settings = {"model": "m", "params": {"max_new_tokens": 6}}
    write_output("jsonl", tmp_path, RESULTS[:2], settings)
    assert (tmp_path / "predictions.jsonl").read_bytes() == (
        b'{"file": "a.csv", "row": 0, "text": "a cat, sitting", "error": null, "model": "m", '
        b'"params": {"max_new_tokens": 6}}\n'
        b'{"file": "a.csv", "row": 1, "text": null, "error": "not an image", "model": "m", '
        b'"params": {"max_new_tokens": 6}}\n'
    )
    write_output("parquet", tmp_path, RESULTS, settings)
    table = pq.read_table(tmp_path / "predictions.parquet").to_pylist()
    assert table[2] == {
        "file": "a.csv",
        "row": 2,
        "text": 'she said "hi"\nand left',
        "error": None,
        "model": "m",
        "params": '{"max_new_tokens": 6}',
    }


# -- the local engine --------------------------------------------------------------------------


def test_local_engine_matches_pipeline_generate(tiny_checkpoint, pipe, folder, tmp_path):
    spec = spec_for(
        tiny_checkpoint,
        folder,
        tmp_path / "out",
        fmt="jsonl",
        recursive=True,
        batch_size=3,
        chunk_size=2,
    )
    summary = runner.run(spec, progress_bar=False)
    assert (summary.rows, summary.done, summary.skipped, summary.failed) == (15, 15, 0, 3)
    lines = [
        json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    ]
    expected_rows = all_rows(spec)
    assert [(x["file"], x["row"]) for x in lines] == [(n, r) for n, r, *_ in expected_rows]
    for line, (_, _, image, prompt, _) in zip(lines, expected_rows, strict=True):
        assert line["params"]["max_new_tokens"] == 6 and line["model"] == str(tiny_checkpoint)
        if line["error"] is None:
            assert line["text"] == pipe.generate([image], [prompt], **GEN)[0][0].text
    errors = {(x["file"], x["row"]): x["error"] for x in lines if x["error"]}
    assert set(errors) == {("azure.csv", 4), ("table.parquet", 2), ("vqa.jsonl", 2)}
    assert "no such file" in errors["vqa.jsonl", 2]


def test_formats_agree_and_rerun_only_merges(tiny_checkpoint, folder, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    runner.run(spec_for(tiny_checkpoint, folder, out, fmt="jsonl"), progress_bar=False)
    jsonl = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    again = runner.run(spec_for(tiny_checkpoint, folder, out, fmt="parquet"), progress_bar=False)
    assert again.done == 0 and again.skipped == again.rows == len(jsonl)  # parts are reused
    parquet = pq.read_table(out / "predictions.parquet").to_pylist()
    assert [(x["file"], x["row"], x["text"]) for x in parquet] == [
        (x["file"], x["row"], x["text"]) for x in jsonl
    ]
    runner.run(spec_for(tiny_checkpoint, folder, out), progress_bar=False)
    csv_lines = (out / "predictions.csv").read_text().count(",azure.csv\n")
    assert csv_lines == 4  # the bad row is left out, as the managed endpoint does
    assert json.loads((out / "errors.jsonl").read_text().splitlines()[0])["row"] == 4


def test_other_settings_are_refused_until_restart(tiny_checkpoint, folder, tmp_path):
    out = tmp_path / "out"
    runner.run(spec_for(tiny_checkpoint, folder, out, limit=3), progress_bar=False)
    with pytest.raises(ResumeConflict, match="--limit was 3, now 4"):
        runner.run(spec_for(tiny_checkpoint, folder, out, limit=4), progress_bar=False)
    summary = runner.run(
        spec_for(tiny_checkpoint, folder, out, limit=4), restart=True, progress_bar=False
    )
    assert (summary.rows, summary.done) == (4, 4)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"gen": {"max_new_tokens": 7}}, "--max-new-tokens was 6, now 7"),
        ({"gen": {**GEN, "do_sample": True}}, "--sample was false, now true"),
        ({"exif_transpose": False}, "--no-exif is given now"),
        ({"chunk_size": 2}, "--chunk-size was 256, now 2"),
        ({"model": "elsewhere"}, '--model was "demo", now "elsewhere"'),
    ],
)
def test_a_resume_with_other_flags_names_the_flag(folder, tmp_path, change, named):
    """A rerun into the same OUTPUT_DIR says which flag differs, and how (no model loads)."""

    def record(spec: BatchSpec) -> dict:
        plan = make_plan(spec)
        return manifest(spec, plan, resolve_params(dataclasses.replace(spec, model="demo")))

    first = BatchSpec(input=str(folder), output_dir=str(tmp_path), device="cpu", gen=GEN)
    Progress(tmp_path).start(record(first))
    with pytest.raises(ResumeConflict) as refused:
        Progress(tmp_path).start(record(dataclasses.replace(first, **change)))
    assert f"({named}); use the same command" in str(refused.value)


def test_progress_of_an_older_chunking_is_refused(tiny_checkpoint, folder, tmp_path):
    """Parts written by a blipserve that chunked image files one by one must not be reused."""
    out = tmp_path / "out"
    runner.run(spec_for(tiny_checkpoint, folder, out, limit=3), progress_bar=False)
    manifest = out / ".blipserve" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 2', '"version": 1'))
    with pytest.raises(ResumeConflict, match="version"):
        runner.run(spec_for(tiny_checkpoint, folder, out, limit=3), progress_bar=False)


@pytest.mark.parametrize(
    ("threshold", "code", "merged"),
    [(-1, 0, True), (3, 0, True), (2, EXIT_THRESHOLD, False), (0, EXIT_THRESHOLD, False)],
)
def test_error_threshold(tiny_checkpoint, folder, tmp_path, capsys, threshold, code, merged):
    out = tmp_path / "out"
    argv = [
        str(folder),
        str(out),
        *model_args(tiny_checkpoint),
        "--max-new-tokens",
        "3",
        "--error-threshold",
        str(threshold),
        "--chunk-size",
        "2",
    ]
    assert main(argv) == code
    summary = json.loads(capsys.readouterr().out)
    assert (out / "predictions.csv").exists() == merged
    if merged:
        assert summary["failed"] == 3 and summary["error"] is None
    else:
        assert "over --error-threshold" in summary["error"]
        assert summary["failed"] == threshold + 1
        assert main([*argv[:-4], "--error-threshold", "-1", "--chunk-size", "2"]) == 0


def test_dry_run_counts_rows_and_writes_nothing(folder, tmp_path, capsys):
    assert main([str(folder), str(tmp_path / "out"), "--dry-run", "--recursive"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["rows"] == 15 and report["files"]["azure.csv"] == 5
    assert report["files"]["cat.png"] == report["files"]["coffee.jpg"] == 1  # one shared chunk
    assert not (tmp_path / "out").exists()


def eight_bad_rows_of_ten(folder: Path) -> Path:
    """A table whose rows 1-3 and 5-9 fail, each for a reason its header or form shows."""
    examples = Path(__file__).parents[1] / "examples"
    for name in ("scene-1.png", "scene-2.png"):
        (folder / name).write_bytes((examples / name).read_bytes())
    (folder / "notes.txt").write_text("not a picture\n")
    Image.new("1", (7000, 7000)).save(folder / "huge.png")  # 49 megapixels, a few kB
    images = [
        "scene-1.png",
        "missing.png",  # no such file
        "notes.txt",  # a file that is not an image
        "ftp://example.com/a.png",  # a scheme we do not fetch
        "scene-2.png",
        "http:///a.png",  # no host
        "huge.png",  # over the pixel limit, refused before decoding
        "",  # empty cell
        base64.b64encode(b"hello, world").decode(),  # base64 of text
        "data:text/plain,hello",  # a data URL that is not base64
    ]
    table = folder / "table.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["image"], *[[image] for image in images]])
    return table


def test_dry_run_reports_the_bad_rows_a_real_run_writes(tmp_path, capsys):
    """Eight bad rows of ten: the dry run names the same rows with the same messages as
    the real run's errors.jsonl, without a model, a download or any pixel decoding."""
    table = eight_bad_rows_of_ten(tmp_path)
    out = tmp_path / "out"
    assert main([str(table), str(out), "--dry-run"]) == 0
    *dry, summary = capsys.readouterr().out.splitlines()
    assert json.loads(summary) == {"files": {"table.csv": 10}, "rows": 10, "failed": 8}
    assert not out.exists()
    argv = [str(table), str(out), "--model", "demo", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    real = (out / "errors.jsonl").read_text().splitlines()
    assert [json.loads(line)["row"] for line in real] == [1, 2, 3, 5, 6, 7, 8, 9]
    assert dry == real
    assert main([str(table), str(tmp_path / "o2"), "--dry-run", "--error-threshold", "7"]) == 3
    assert "8 rows would fail, over --error-threshold 7" in capsys.readouterr().err


# -- transient failures ------------------------------------------------------------------------


class FlakyImages(http.server.BaseHTTPRequestHandler):
    """/flaky: 503 on the first request, then the image; /gone: always 404."""

    image = b""
    hits: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/flaky" and self.hits[self.path] == 1:
            self.send_error(503)
        elif self.path == "/gone":
            self.send_error(404)
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(("retries", "failed"), [(1, 1), (0, 2)])
def test_transient_fetch_errors_are_retried(tiny_checkpoint, photos, tmp_path, retries, failed):
    FlakyImages.image, FlakyImages.hits = jpeg_bytes(photos["coffee"]), {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyImages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        write_jsonl(
            tmp_path / "urls.jsonl", [{"image": f"{base}/flaky"}, {"image": f"{base}/gone"}]
        )
        spec = spec_for(
            tiny_checkpoint,
            tmp_path / "urls.jsonl",
            tmp_path / "out",
            fmt="jsonl",
            allow_private_urls=True,
            max_retries=retries,
        )
        summary = runner.run(spec, progress_bar=False)
    finally:
        server.shutdown()
    assert summary.failed == failed
    assert FlakyImages.hits == {"/flaky": 1 + retries, "/gone": 1}  # 404 is not retried
    lines = [
        json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    ]
    assert "HTTP 404" in lines[1]["error"]
    assert (lines[0]["error"] is None) == (retries > 0)


def test_private_urls_are_refused_by_default(tiny_checkpoint, tmp_path):
    write_jsonl(tmp_path / "u.jsonl", [{"image": "http://127.0.0.1:9/x.png"}])
    spec = spec_for(tiny_checkpoint, tmp_path / "u.jsonl", tmp_path / "out", fmt="jsonl")
    assert runner.run(spec, progress_bar=False).failed == 1
    line = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
    assert "loopback" in line["error"]


@pytest.mark.parametrize(("status", "transient"), [(503, True), (429, True), (404, False)])
def test_fetch_errors_say_whether_a_retry_may_help(status, transient):
    import http.server
    import socket
    import threading

    from blipserve.errors import InvalidImage
    from blipserve.processing.fetch import UrlPolicy, fetch_url

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    policy = UrlPolicy(allow_private=True)
    try:
        with pytest.raises(InvalidImage) as err:
            fetch_url(f"http://127.0.0.1:{server.server_port}/x.png", policy=policy)
        assert err.value.transient is transient and str(status) in err.value.reason
    finally:
        server.shutdown()
    with socket.socket() as closed:  # a port nobody listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(InvalidImage) as err:
        fetch_url(f"http://127.0.0.1:{port}/x.png", policy=policy)
    assert err.value.transient
    with pytest.raises(InvalidImage) as err:  # refused by policy: permanent
        fetch_url(f"http://127.0.0.1:{port}/x.png")
    assert not err.value.transient


def test_outputs_inside_the_input_folder_are_not_inputs(tiny_checkpoint, folder, tmp_path):
    import shutil

    root = tmp_path / "in"
    shutil.copytree(folder, root)
    spec = spec_for(tiny_checkpoint, root, root / "out", fmt="jsonl", limit=2, recursive=True)
    runner.run(spec, progress_bar=False)
    assert runner.run(spec, progress_bar=False).skipped == 2  # not a conflict: same inputs
