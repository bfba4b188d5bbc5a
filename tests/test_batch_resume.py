"""Exactly-once: a real ``blipserve batch`` process killed with SIGKILL mid-run, then rerun
with the same command, writes the same bytes as a run that was never interrupted."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.batch_inputs import jpeg_bytes, write_azure_sample_csv, write_jsonl

ROWS_CSV, ROWS_JSONL = 24, 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photos) -> Path:
    root = tmp_path_factory.mktemp("resume-inputs")
    names = list(photos)
    data = [jpeg_bytes(photos[names[i % 4]], (40 + i, 40)) for i in range(ROWS_CSV)]
    data[5] = b"broken"  # a failed row must stay exactly-once too
    write_azure_sample_csv(root / "a.csv", data, prompts=[f"a photo of {i}," for i in range(24)])
    photos["coffee"].resize((60, 60)).save(root / "coffee.png")
    write_jsonl(root / "b.jsonl", [{"image": "coffee.png", "text": f"q{i}"} for i in range(12)])
    return root


def command(checkpoint, inputs: Path, out: Path, fmt: str) -> list[str]:
    return [
        sys.executable, "-m", "blipserve.batch.main", str(inputs), str(out),
        "--model", str(checkpoint), "--device", "cpu", "--dtype", "float32",
        "--max-new-tokens", "12", "--chunk-size", "3", "--batch-size", "2",
        "--format", fmt, "--no-progress",
    ]  # fmt: skip


def run_to_end(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def kill_when(cmd: list[str], out: Path, parts: int) -> int:
    """Start a run and SIGKILL it once ``parts`` chunks are committed; the parts at death."""
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = out / ".blipserve" / "parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if folder.is_dir() and sum(p.suffix == ".jsonl" for p in folder.iterdir()) >= parts:
            break
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return len(list(folder.glob("*.jsonl"))) if folder.is_dir() else 0


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, inputs, tmp_path_factory) -> dict[str, bytes]:
    """Uninterrupted runs' outputs, per format."""
    outputs = {}
    for fmt, name in (("azure-csv", "predictions.csv"), ("jsonl", "predictions.jsonl")):
        out = tmp_path_factory.mktemp(f"reference-{fmt}")
        run_to_end(command(tiny_checkpoint, inputs, out, fmt))
        outputs[fmt] = (out / name).read_bytes()
    return outputs


@pytest.mark.parametrize("kill_points", [(1,), (4, 9), (0, 2, 6, 11)])
def test_killed_runs_resume_to_the_same_bytes(
    tiny_checkpoint, inputs, reference, tmp_path, kill_points
):
    out = tmp_path / "out"
    cmd = command(tiny_checkpoint, inputs, out, "jsonl")
    seen = []
    for parts in kill_points:
        seen.append(kill_when(cmd, out, parts))
    assert seen == sorted(seen)  # every kill kept what was committed before it
    run_to_end(cmd)
    assert (out / "predictions.jsonl").read_bytes() == reference["jsonl"]
    lines = reference["jsonl"].split(b"\n")[:-1]
    assert len(lines) == ROWS_CSV + ROWS_JSONL + 1  # one line per input row (+ coffee.png)
    assert not list(out.rglob(".tmp-*"))


def test_kill_at_random_moments_then_azure_csv(tiny_checkpoint, inputs, reference, tmp_path):
    out = tmp_path / "out"
    cmd = command(tiny_checkpoint, inputs, out, "azure-csv")
    for delay in (0.5, 2.5, 3.5):  # during start-up, loading and generation
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
    run_to_end(cmd)
    assert (out / "predictions.csv").read_bytes() == reference["azure-csv"]


def test_leftovers_of_a_kill_during_the_merge_are_harmless(
    tiny_checkpoint, inputs, reference, tmp_path
):
    out = tmp_path / "out"
    cmd = command(tiny_checkpoint, inputs, out, "jsonl")
    run_to_end(cmd)
    # What a kill between "temporary file written" and "renamed" leaves behind.
    (out / ".tmp-1-2-predictions.jsonl").write_text('{"half a li')
    (out / ".blipserve" / "parts" / ".tmp-1-2-000000-00000001.jsonl").write_text("{")
    (out / "predictions.jsonl").write_text("stale\n")
    run_to_end(cmd)
    assert (out / "predictions.jsonl").read_bytes() == reference["jsonl"]
    assert not list(out.rglob(".tmp-*"))


def test_killed_ray_driver_resumes_to_the_same_bytes(tiny_checkpoint, inputs, reference, tmp_path):
    """The Ray engine's driver (which starts its own local Ray) SIGKILLed with chunks
    committed and others in flight; the same command run again finishes the job."""
    pytest.importorskip("ray")
    out = tmp_path / "out"
    cmd = [*command(tiny_checkpoint, inputs, out, "jsonl"), "--engine", "ray", "--threads", "1"]
    child = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        folder = out / ".blipserve" / "parts"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and child.poll() is None:
            if folder.is_dir() and sum(p.suffix == ".jsonl" for p in folder.iterdir()) >= 2:
                break
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        committed = len(list(folder.glob("*.jsonl")))
        assert 2 <= committed < 13  # killed mid-job: 13 chunks in all
        run_to_end(cmd)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # whatever of the first Ray outlived it
    assert (out / "predictions.jsonl").read_bytes() == reference["jsonl"]
    assert not list(out.rglob(".tmp-*"))
