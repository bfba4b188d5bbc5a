"""A 10,000-row input runs with flat memory: the prefetch queue bounds what is in flight.

The child process reports its own peak resident set; the 10,000-row run must not use much
more than a 1,000-row run (a run that held every row, or every result, would grow ~10x).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.batch_inputs import jpeg_bytes

REPORT_PEAK = (
    "import resource, sys; from blipserve.batch.main import main; code = main(sys.argv[1:]); "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
)


def write_rows(path: Path, rows: int, image: str) -> None:
    with open(path, "w") as f:
        f.write(",image,text\n")
        for i in range(rows):
            f.write(f'{i},"{image}",photo {i % 7}\n')


def peak_rss_mb(checkpoint, table: Path, out: Path) -> tuple[float, dict]:
    cmd = [
        sys.executable, "-c", REPORT_PEAK, str(table), str(out), "--model", str(checkpoint),
        "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2", "--batch-size", "32",
        "--threads", "2", "--no-progress", "--format", "jsonl",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, timeout=1200, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    peak = next(int(x.split()[1]) for x in lines if x.startswith("PEAK_RSS_KB"))
    return peak / 1024, json.loads(lines[0])


def test_ten_thousand_rows_with_flat_memory(tiny_checkpoint, photos, tmp_path):
    import base64

    image = base64.b64encode(jpeg_bytes(photos["chelsea"], (32, 32))).decode()
    write_rows(tmp_path / "small.csv", 1_000, image)
    write_rows(tmp_path / "big.csv", 10_000, image)
    small_mb, _ = peak_rss_mb(tiny_checkpoint, tmp_path / "small.csv", tmp_path / "o1")
    big_mb, summary = peak_rss_mb(tiny_checkpoint, tmp_path / "big.csv", tmp_path / "o2")
    print(f"peak RSS: 1,000 rows {small_mb:.0f} MB, 10,000 rows {big_mb:.0f} MB; {summary}")
    assert summary["done"] == 10_000 and summary["failed"] == 0
    assert (tmp_path / "o2" / "predictions.jsonl").read_bytes().count(b"\n") == 10_000
    assert big_mb < small_mb + 64
