"""Final outputs, merged from the committed parts in (file, row) order.

- ``azure-csv``: ``predictions.csv`` as Azure ML's batch endpoint writes it: no header, rows
  ``row_number_per_file,text,file_name``, RFC 4180 quoting (captions holding commas, quotes
  or newlines are quoted, quotes doubled). Failed rows are left out, as there, and listed in
  ``errors.jsonl`` (``{"file", "row", "error"}`` per line).
- ``jsonl``: ``predictions.jsonl``, one object per input row:
  ``{"file", "row", "text", "error", "model", "params"}``.
- ``parquet``: ``predictions.parquet`` with the same columns; ``params`` is a JSON string.

Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from blipserve.batch.progress import Result, atomic_file

FORMATS = ("azure-csv", "jsonl", "parquet")
OUTPUT_NAMES = {
    "azure-csv": "predictions.csv",
    "jsonl": "predictions.jsonl",
    "parquet": "predictions.parquet",
}
PARQUET_WRITE_ROWS = 4096


def write_output(
    fmt: str, output_dir: Path, results: Iterable[Result], settings: dict[str, Any]
) -> Path:
    """Write ``results`` (already in order) as ``fmt``; returns the predictions file."""
    path = output_dir / OUTPUT_NAMES[fmt]
    if fmt == "azure-csv":
        write_azure_csv(path, output_dir / "errors.jsonl", results)
    elif fmt == "jsonl":
        write_jsonl(path, results, settings)
    else:
        write_parquet(path, results, settings)
    return path


def write_azure_csv(path: Path, errors_path: Path, results: Iterable[Result]) -> None:
    with atomic_file(path) as out, atomic_file(errors_path) as errors:
        writer = csv.writer(out, lineterminator="\n")
        for r in results:
            if r.error is None:
                writer.writerow([r.row, r.text, r.file])
            else:
                errors.write(error_line(r) + "\n")


def error_line(r: Result) -> str:
    """A failed row as one line of errors.jsonl."""
    return json.dumps({"file": r.file, "row": r.row, "error": r.error}, ensure_ascii=False)


def write_jsonl(path: Path, results: Iterable[Result], settings: dict[str, Any]) -> None:
    with atomic_file(path) as out:
        for r in results:
            record = {"file": r.file, "row": r.row, "text": r.text, "error": r.error, **settings}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_parquet(path: Path, results: Iterable[Result], settings: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("file", pa.string()),
            ("row", pa.int64()),
            ("text", pa.string()),
            ("error", pa.string()),
            ("model", pa.string()),
            ("params", pa.string()),
        ]
    )
    model, params = settings["model"], json.dumps(settings["params"], sort_keys=True)
    with atomic_file(path, "wb") as out, pq.ParquetWriter(out, schema) as writer:
        for block in _blocks(results, PARQUET_WRITE_ROWS):
            columns = {
                "file": [r.file for r in block],
                "row": [r.row for r in block],
                "text": [r.text for r in block],
                "error": [r.error for r in block],
                "model": [model] * len(block),
                "params": [params] * len(block),
            }
            writer.write_table(pa.table(columns, schema=schema))


def _blocks(results: Iterable[Result], size: int) -> Iterator[list[Result]]:
    block: list[Result] = []
    for r in results:
        block.append(r)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block
