"""Batch inputs: find the files, then stream their rows without loading a file whole.

A row is one image and an optional prompt, numbered from 0 within its file:

    photo.jpg                -> row 0: the image file itself, no prompt
    table.csv  (,image,text) -> one row per record; pandas' unnamed index column is ignored
    table.jsonl              -> one row per non-blank line, {"image": ..., "text": ...}
    table.parquet / .pqt     -> one row per table row, read in small record batches

An ``image`` value is base64 (plain, MIME with newlines, or a data: URL), an http(s) URL,
raw bytes (parquet binary) or a path relative to the table's folder. A row that cannot be
read (a malformed JSON line, a missing ``image`` value) is still yielded, with ``error`` set,
so it counts as one failed row and numbering stays stable.

Rows are grouped into chunks of at most ``chunk_size`` consecutive rows: rows of one table,
or a run of consecutive image files (one row each), so a folder of photos fills whole
batches. A :class:`ChunkRef` remembers where its first row starts (a byte offset in CSV and
JSONL files, a row number in parquet), so any process can read one chunk without rereading
its file from the top.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from blipserve.errors import BlipserveError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tiff", ".tif", ".webp")
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet", ".pqt")
IMAGE_COLUMN = "image"
TEXT_COLUMN = "text"
PARQUET_READ_ROWS = 64  # rows per parquet record batch: a few MB of base64 at most

# Base64 images in CSV cells are far longer than csv's default 128 KiB field limit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class InputError(BlipserveError):
    """An input file or folder cannot be read as batch input (not a per-row problem)."""


@dataclass(frozen=True)
class Row:
    """One input row: its number in its file, the image source and the prompt."""

    row: int
    image: str | bytes | Path | None
    prompt: str | None = None
    error: str | None = None  # set when the row itself could not be read


@dataclass(frozen=True)
class ChunkRef:
    """Rows ``first_row .. first_row + n_rows - 1`` of input file ``file_index``, or, when
    ``n_files > 1``, row 0 of each image file ``file_index .. file_index + n_files - 1``."""

    file_index: int
    chunk_index: int
    first_row: int
    n_rows: int
    offset: int  # byte offset of the first row (CSV, JSONL); 0 for images and parquet
    n_files: int = 1

    @property
    def name(self) -> str:
        return f"{self.file_index:06d}-{self.chunk_index:08d}"

    def position(self, i: int) -> tuple[int, int]:
        """(file index, row number in that file) of the chunk's ``i``-th row."""
        if self.n_files > 1:
            return self.file_index + i, 0
        return self.file_index, self.first_row + i

    def file_rows(self) -> dict[int, int]:
        """File index -> rows of that file in this chunk."""
        if self.n_files > 1:
            return dict.fromkeys(range(self.file_index, self.file_index + self.n_files), 1)
        return {self.file_index: self.n_rows}


def discover(input_path: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """The input files under ``input_path`` (a file or folder), sorted by relative path."""
    root = Path(input_path)
    if root.is_file():
        if not is_input(root):
            raise InputError(f"{root} is not a supported input ({_supported()})")
        return [root]
    if not root.is_dir():
        raise InputError(f"no such file or folder: {root}")
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = sorted(
        (p for p in candidates if p.is_file() and is_input(p) and not _hidden(p, root)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        hint = "" if recursive else " (pass --recursive to look in subfolders)"
        raise InputError(f"no input files in {root}{hint}; expected {_supported()}")
    return files


def display_name(path: Path, input_path: str | os.PathLike) -> str:
    """The name a file goes by in outputs: relative to the input folder, '/'-separated."""
    root = Path(input_path)
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def is_input(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES + TABLE_SUFFIXES


def plan_chunks(files: list[Path], chunk_size: int, limit: int | None) -> list[ChunkRef]:
    """Every chunk of ``files`` in order, of the first ``limit`` rows when given (reads each
    table once; decodes no image). Consecutive image files share chunks."""
    chunks: list[ChunkRef] = []
    left = limit
    for i, path in enumerate(files):
        if left == 0:
            break
        if _kind(path) == "image":
            last = chunks[-1] if chunks else None
            if last is not None and _images_up_to(last, files, i - 1) and last.n_rows < chunk_size:
                chunks[-1] = dataclasses.replace(
                    last, n_rows=last.n_rows + 1, n_files=last.n_files + 1
                )
            else:
                chunks.append(ChunkRef(i, 0, 0, 1, 0))
            rows = 1
        else:
            found = scan_chunks(path, i, chunk_size, left)
            chunks += found
            rows = sum(c.n_rows for c in found)
        if left is not None:
            left -= rows
    return chunks


def _images_up_to(chunk: ChunkRef, files: list[Path], index: int) -> bool:
    """Whether ``chunk`` holds image files only, the last of them ``files[index]``."""
    return (
        _kind(files[chunk.file_index]) == "image" and chunk.file_index + chunk.n_files - 1 == index
    )


def scan_chunks(path: Path, file_index: int, chunk_size: int, limit: int | None) -> list[ChunkRef]:
    """Split one table's rows into chunks (reads the file once; decodes no image)."""
    assert chunk_size > 0
    chunks: list[ChunkRef] = []
    for row, offset in _row_offsets(path):
        if limit is not None and row >= limit:
            break
        if row % chunk_size == 0:
            chunks.append(ChunkRef(file_index, row // chunk_size, row, 0, offset))
        chunks[-1] = dataclasses.replace(chunks[-1], n_rows=chunks[-1].n_rows + 1)
    return chunks


def read_chunk(files: list[Path], ref: ChunkRef) -> Iterator[Row]:
    """The rows of one chunk, in order (``files``: the plan's input files)."""
    if ref.n_files > 1:
        for path in files[ref.file_index : ref.file_index + ref.n_files]:
            yield Row(0, path)
        return
    rows = _read_rows(files[ref.file_index], ref.first_row, ref.offset)
    for _, row in zip(range(ref.n_rows), rows, strict=False):
        yield row


# -- per file type -----------------------------------------------------------------------------


def _row_offsets(path: Path) -> Iterator[tuple[int, int]]:
    """(row number, offset to start reading it at) for every row of ``path``."""
    kind = _kind(path)
    if kind == "image":
        yield 0, 0
    elif kind == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as parquet:
            _parquet_columns(parquet, path)
            for row in range(parquet.metadata.num_rows):
                yield row, 0
    else:
        with open(path, "rb") as f:
            records = _csv_records(f, path) if kind == "csv" else _jsonl_records(f)
            for row, (offset, _) in enumerate(records):
                yield row, offset


def _read_rows(path: Path, first_row: int, offset: int) -> Iterator[Row]:
    kind = _kind(path)
    if kind == "image":
        yield Row(0, path)
    elif kind == "parquet":
        yield from _parquet_rows(path, first_row)
    elif kind == "csv":
        with open(path, "rb") as f:
            header = _csv_header(f, path)
            f.seek(offset)
            reader = csv.reader(_lines(f))
            for row, cells in enumerate((c for c in reader if c), start=first_row):
                yield _csv_row(row, cells, header, path)
    else:
        with open(path, "rb") as f:
            f.seek(offset)
            for row, (_, line) in enumerate(_jsonl_records(f), start=first_row):
                yield _jsonl_row(row, line, path)


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in (".parquet", ".pqt"):
        return "parquet"
    return suffix.lstrip(".")


def _lines(f: BinaryIO) -> Iterator[str]:
    """Decoded lines of a binary file; csv asks for as many as a record needs."""
    while line := f.readline():
        yield line.decode("utf-8", errors="replace")


def _csv_header(f: BinaryIO, path: Path) -> dict[str, int]:
    """Column name -> index, from the first record; leaves ``f`` after the header."""
    first = f.readline()
    f.seek(0)
    if first.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        f.seek(3)
    reader = csv.reader(_lines(f))
    try:
        names = next(reader)
    except StopIteration:
        message = f"{path} is empty; a CSV input needs a header with an 'image' column"
        raise InputError(message) from None
    columns = {name.strip(): i for i, name in enumerate(names)}
    if IMAGE_COLUMN not in columns:
        raise InputError(
            f"{path} has no '{IMAGE_COLUMN}' column (header: {', '.join(names) or 'empty'})"
        )
    return columns


def _csv_records(f: BinaryIO, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(byte offset where the record starts, cells) for each data record."""
    _csv_header(f, path)
    position = f.tell()

    def tracked() -> Iterator[str]:
        nonlocal position
        while line := f.readline():
            position = f.tell()
            yield line.decode("utf-8", errors="replace")

    start = position
    for cells in csv.reader(tracked()):
        if cells:  # blank lines are not rows, as in pandas
            yield start, cells
        start = position


def _csv_row(row: int, cells: list[str], header: dict[str, int], path: Path) -> Row:
    def cell(name: str) -> str | None:
        i = header.get(name)
        return cells[i] if i is not None and i < len(cells) else None

    return _table_row(row, cell(IMAGE_COLUMN), cell(TEXT_COLUMN), path)


def _jsonl_records(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) for each non-blank line."""
    while True:
        start = f.tell()
        line = f.readline()
        if not line:
            return
        if line.strip():
            yield start, line


def _jsonl_row(row: int, line: bytes, path: Path) -> Row:
    try:
        record = json.loads(line)
    except ValueError as err:
        return Row(row, None, error=f"line is not valid JSON: {err}")
    if not isinstance(record, dict):
        return Row(row, None, error=f"line is a JSON {type(record).__name__}, not an object")
    return _table_row(row, record.get(IMAGE_COLUMN), record.get(TEXT_COLUMN), path)


def _parquet_columns(parquet: Any, path: Path) -> list[str]:
    names = parquet.schema_arrow.names
    if IMAGE_COLUMN not in names:
        raise InputError(f"{path} has no '{IMAGE_COLUMN}' column (columns: {', '.join(names)})")
    return [IMAGE_COLUMN] + ([TEXT_COLUMN] if TEXT_COLUMN in names else [])


def _parquet_rows(path: Path, first_row: int) -> Iterator[Row]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        columns = _parquet_columns(parquet, path)
        groups, skip = [], first_row
        for i in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(i).num_rows
            if groups or skip < n:
                groups.append(i)
            else:
                skip -= n
        row = first_row - skip
        for batch in parquet.iter_batches(PARQUET_READ_ROWS, row_groups=groups, columns=columns):
            images = batch.column(IMAGE_COLUMN).to_pylist()
            texts = batch.column(TEXT_COLUMN).to_pylist() if len(columns) > 1 else None
            for i, image in enumerate(images):
                if row >= first_row:
                    yield _table_row(row, image, texts[i] if texts else None, path)
                row += 1


def _table_row(row: int, image: Any, text: Any, table: Path) -> Row:
    if text is not None and not isinstance(text, str):
        return Row(row, None, error=f"'{TEXT_COLUMN}' must be a string, got {type(text).__name__}")
    prompt = text or None
    if isinstance(image, bytes):
        return Row(row, image, prompt) if image else Row(row, None, error="empty image value")
    if image is None:
        return Row(row, None, error=f"'{IMAGE_COLUMN}' value is missing")
    if not isinstance(image, str):
        return Row(row, None, error=f"'{IMAGE_COLUMN}' value is a {type(image).__name__}")
    if not image.strip():
        return Row(row, None, error=f"'{IMAGE_COLUMN}' value is empty")
    return Row(row, _relative_path(image, table) or image, prompt)


def _relative_path(value: str, table: Path) -> Path | None:
    """``value`` as a file next to ``table`` (relative paths), if it names one."""
    if len(value) > 1024 or "\n" in value or "://" in value[:16] or value[:5].lower() == "data:":
        return None
    candidate = table.parent / value
    try:
        return candidate if candidate.is_file() else None
    except OSError:  # e.g. a name too long for the file system
        return None


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _supported() -> str:
    return " ".join(IMAGE_SUFFIXES + TABLE_SUFFIXES)
