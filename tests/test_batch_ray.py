"""The Ray engine on a local Ray instance: the same bytes as the local engine, resumable."""

from __future__ import annotations

import dataclasses

import pytest

from blipserve.batch import runner
from blipserve.batch.job import BatchSpec, RayOptions
from tests.batch_inputs import mixed_folder

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def spec_for(checkpoint, folder, out, fmt: str) -> BatchSpec:
    return BatchSpec(
        input=str(folder),
        output_dir=str(out),
        model=str(checkpoint),
        fmt=fmt,
        recursive=True,
        device="cpu",
        dtype="float32",
        gen={"max_new_tokens": 6},
        batch_size=2,
        chunk_size=2,
        threads=1,
    )


@pytest.mark.parametrize("fmt", ["azure-csv", "jsonl"])
def test_ray_output_equals_local_and_resumes(tiny_checkpoint, photos, tmp_path, local_ray, fmt):
    folder = mixed_folder(tmp_path / "in", photos)
    name = {"azure-csv": "predictions.csv", "jsonl": "predictions.jsonl"}[fmt]
    local = runner.run(
        spec_for(tiny_checkpoint, folder, tmp_path / "local", fmt), progress_bar=False
    )
    options = RayOptions(workers=1)
    spec = spec_for(tiny_checkpoint, folder, tmp_path / "ray", fmt)
    summary = runner.run(spec, engine="ray", ray=options, progress_bar=False)
    assert (summary.rows, summary.done, summary.failed) == (local.rows, local.rows, local.failed)
    expected = (tmp_path / "local" / name).read_bytes()
    assert (tmp_path / "ray" / name).read_bytes() == expected
    # Resume: drop some committed chunks, as if the job died; Ray redoes exactly those.
    parts = sorted((tmp_path / "ray" / ".blipserve" / "parts").glob("*.jsonl"))[1::3]
    dropped = sum(len(p.read_bytes().split(b"\n")) - 1 for p in parts)
    for part in parts:
        part.unlink()
    again = runner.run(spec, engine="ray", ray=options, progress_bar=False)
    assert again.done == dropped > 0
    assert again.skipped + again.done == again.rows
    assert (tmp_path / "ray" / name).read_bytes() == expected


def test_ray_two_workers_and_error_threshold(tiny_checkpoint, photos, tmp_path, local_ray):
    folder = mixed_folder(tmp_path / "in", photos)
    spec = spec_for(tiny_checkpoint, folder, tmp_path / "out", "jsonl")
    two = RayOptions(workers=2)
    stopped = runner.run(
        dataclasses.replace(spec, error_threshold=0), engine="ray", ray=two, progress_bar=False
    )
    assert "over --error-threshold 0" in stopped.error and stopped.output is None
    done = runner.run(spec, engine="ray", ray=two, progress_bar=False)
    assert done.error is None and done.failed == 3 and done.skipped + done.done == done.rows
    local = runner.run(dataclasses.replace(spec, output_dir=str(tmp_path / "local")))
    assert local.failed == 3
    expected = (tmp_path / "local" / "predictions.jsonl").read_bytes()
    assert (tmp_path / "out" / "predictions.jsonl").read_bytes() == expected
