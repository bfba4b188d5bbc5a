"""Tabular request bodies (pandas orients, MLflow inputs, CSV) -> rows of (image, prompt).

Both the Azure ML route and the MLflow route take tables with an ``image`` column
(base64, a ``data:`` URL or an http(s) URL) and an optional ``text`` column (the prompt,
e.g. ``"Question: what is it? Answer:"``). Anything else is an error naming the row or
column.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from blipserve.errors import InvalidImage, InvalidRequest
from blipserve.server.service import Row

IMAGE, TEXT = "image", "text"
CSV_FIELD_LIMIT = 2**31 - 1  # the request body limit applies first
INDEX_COLUMNS = ("", "index", "Unnamed: 0")  # a pandas index written beside the data


def rows_from_split(columns: Sequence[Any], data: Sequence[Any]) -> list[Row]:
    """``{"columns": [...], "data": [[...], ...]}`` (pandas split orient)."""
    names = _check_columns(columns)
    records = []
    for i, values in enumerate(data):
        if not isinstance(values, list | tuple) or len(values) != len(names):
            raise InvalidRequest(
                f"row {i}: expected a list of {len(names)} values for columns {names}, "
                f"got {_describe(values)}"
            )
        records.append(dict(zip(names, values, strict=True)))
    return [_row(i, record) for i, record in enumerate(records)]


def rows_from_records(records: Sequence[Any]) -> list[Row]:
    """``[{"image": ..., "text": ...}, ...]`` (pandas records orient, MLflow instances)."""
    rows = []
    for i, record in enumerate(records):
        if isinstance(record, str):  # a bare list of images
            record = {IMAGE: record}
        if not isinstance(record, Mapping):
            raise InvalidRequest(
                f"row {i}: expected an object with 'image', got {_describe(record)}"
            )
        _check_columns(list(record), row=i)
        rows.append(_row(i, record))
    return rows


def rows_from_columns(columns: Mapping[str, Any]) -> list[Row]:
    """``{"image": [...], "text": [...]}`` (MLflow ``inputs`` as named columns)."""
    names = _check_columns(list(columns))
    lengths = {name: len(v) if isinstance(v, list) else -1 for name, v in columns.items()}
    if any(n < 0 for n in lengths.values()) or len(set(lengths.values())) != 1:
        raise InvalidRequest(f"every column must be a list of the same length; got {lengths}")
    count = lengths[IMAGE]
    return [_row(i, {n: columns[n][i] for n in names}) for i in range(count)]


def rows_from_csv(text: str) -> list[Row]:
    """A CSV body with a header: ``image[,text]``, optionally after a pandas index column."""
    csv.field_size_limit(CSV_FIELD_LIMIT)  # base64 images are long fields
    try:
        return _csv_rows(csv.reader(io.StringIO(text)))
    except csv.Error as err:
        raise InvalidRequest(f"the CSV body could not be parsed: {err}") from None


def _csv_rows(reader) -> list[Row]:
    header = next(reader, None)
    if not header:
        raise InvalidRequest("the CSV body is empty; expected a header with an 'image' column")
    keep = [i for i, name in enumerate(header) if name not in INDEX_COLUMNS]
    names = _check_columns([header[i] for i in keep])
    records = []
    for line, values in enumerate(reader):
        if len(values) != len(header):
            raise InvalidRequest(
                f"row {line}: {len(values)} CSV fields, the header has {len(header)}"
            )
        records.append({name: values[i] for name, i in zip(names, keep, strict=True)})
    return [_row(i, record) for i, record in enumerate(records)]


def _check_columns(columns: Sequence[Any], row: int | None = None) -> list[str]:
    names = [str(c) for c in columns]
    where = f"row {row}: " if row is not None else ""
    unknown = [n for n in names if n not in (IMAGE, TEXT)]
    if unknown:
        raise InvalidRequest(
            f"{where}unknown column {unknown[0]!r}; expected 'image' and optionally 'text'"
        )
    if IMAGE not in names:
        raise InvalidRequest(f"{where}missing the 'image' column (base64 or an http(s) URL)")
    if len(set(names)) != len(names):
        raise InvalidRequest(f"{where}duplicate columns in {names}")
    return names


def _row(i: int, record: Mapping[str, Any]) -> Row:
    image = record[IMAGE]
    if not isinstance(image, str) or not image.strip():
        raise InvalidImage(
            f"the image must be base64 text or an http(s) URL, got {_describe(image)}", row=i
        )
    prompt = record.get(TEXT)
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequest(f"row {i}: 'text' must be a string, got {_describe(prompt)}")
    return Row(image, prompt or "")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"a string of {len(value)} characters"
    return f"{type(value).__name__} {str(value)[:40]}"
