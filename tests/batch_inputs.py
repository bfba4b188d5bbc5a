"""Batch input files for the tests, written the way users' tools write them."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image


def jpeg_bytes(image: Image.Image, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").resize(size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_azure_sample_csv(path: Path, images: list[bytes], prompts: list[str] | None = None):
    """What Azure ML's sample notebook writes with pandas: the index column (header ``,image``)
    and MIME base64 (a newline every 76 characters) inside quoted fields."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["", "image"] + (["text"] if prompts else []))
        for i, data in enumerate(images):
            row = [i, base64.encodebytes(data).decode()]
            writer.writerow(row + ([prompts[i]] if prompts else []))


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int = 3) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def mixed_folder(root: Path, photos: dict[str, Image.Image]) -> Path:
    """A folder with every input type: image files, CSV (Azure sample shape), JSONL with a
    relative path, parquet (binary and base64), a subfolder and one bad row per table."""
    root.mkdir(parents=True, exist_ok=True)
    cat, coffee, astronaut, china = (photos[k] for k in ("chelsea", "coffee", "astronaut", "china"))
    cat.resize((80, 60)).save(root / "cat.png")
    coffee.resize((60, 80)).save(root / "coffee.jpg")
    data = [jpeg_bytes(p) for p in (cat, coffee, astronaut, china)]
    write_azure_sample_csv(root / "azure.csv", [*data, b"not an image"])
    write_jsonl(
        root / "vqa.jsonl",
        [
            {"image": "cat.png", "text": "Question: what animal is it? Answer:"},
            {"image": base64.b64encode(data[2]).decode(), "text": "a photo of"},
            {"image": "missing.png"},
        ],
    )
    write_parquet(
        root / "table.parquet",
        {"image": [data[3], data[0], b"", data[1]], "text": ["a", None, "b", "c, d"]},
    )
    (root / "sub").mkdir(exist_ok=True)
    astronaut.resize((50, 50)).save(root / "sub" / "astronaut.webp")
    return root
