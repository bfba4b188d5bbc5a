"""What a batch run is asked to do: one picklable settings object both engines share."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blipserve.api import Pipeline, load
from blipserve.batch.sources import ChunkRef, discover, display_name, plan_chunks
from blipserve.engine.params import GenerationParams
from blipserve.errors import BlipserveError, InvalidRequest
from blipserve.generation_config import CheckpointDefaults
from blipserve.model.blip2 import Blip2Config
from blipserve.processing.fetch import UrlPolicy
from blipserve.resolve import resolve_checkpoint, resolve_device, resolve_dtype


class ThresholdExceeded(BlipserveError):
    """More rows failed than ``--error-threshold`` allows."""


@dataclass(frozen=True)
class BatchSpec:
    """Settings of one ``blipserve batch`` run (flags, after validation)."""

    input: str
    output_dir: str
    model: str = "demo"
    fmt: str = "azure-csv"
    recursive: bool = False
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None
    exif_transpose: bool = True
    allow_private_urls: bool = False
    gen: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None  # None: 32 on a GPU, 16 on CPU
    chunk_size: int = 256
    threads: int = 4
    max_retries: int = 3
    error_threshold: int = -1
    limit: int | None = None

    def validate(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidRequest("--batch-size must be at least 1")
        if self.chunk_size < 1:
            raise InvalidRequest("--chunk-size must be at least 1")
        if self.threads < 1:
            raise InvalidRequest("--threads must be at least 1")
        if self.max_retries < 0:
            raise InvalidRequest("--max-retries must be 0 or more")
        if self.error_threshold < -1:
            raise InvalidRequest("--error-threshold must be -1 (no limit), 0 or more")
        if self.limit is not None and self.limit < 0:
            raise InvalidRequest("--limit must be 0 or more")
        if self.gen.get("num_return_sequences", 1) != 1:
            raise InvalidRequest("batch writes one text per row: --num-return-sequences must be 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Plan:
    """The input files, their output names, and every chunk of every file in order."""

    files: list[Path]
    names: list[str]
    chunks: list[ChunkRef]

    @property
    def rows(self) -> int:
        return sum(c.n_rows for c in self.chunks)


def make_plan(spec: BatchSpec) -> Plan:
    """Find the inputs and chunk them (reads every table once; decodes no image)."""
    output = Path(spec.output_dir).resolve()
    found = discover(spec.input, recursive=spec.recursive)
    files = [f for f in found if not f.resolve().is_relative_to(output)]  # not our own outputs
    names = [display_name(f, spec.input) for f in files]
    return Plan(files, names, plan_chunks(files, spec.chunk_size, spec.limit))


def resolve_params(spec: BatchSpec) -> GenerationParams:
    """The generation settings over the checkpoint's defaults, without loading weights."""
    directory = resolve_checkpoint(spec.model)
    config = Blip2Config.from_hf(json.loads((directory / "config.json").read_text()))
    defaults = CheckpointDefaults.read(directory, config)
    return GenerationParams.resolve(defaults.params, spec.gen)


def manifest(spec: BatchSpec, plan: Plan, params: GenerationParams) -> dict[str, Any]:
    """Everything the results depend on; a resume must match it exactly."""
    inputs = []
    for path, name in zip(plan.files, plan.names, strict=True):
        stat = os.stat(path)
        inputs.append({"name": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    record = {
        "input": os.path.abspath(spec.input),
        "inputs": inputs,
        "model": spec.model,
        # "auto" means different dtypes on different machines: record the one used
        "dtype": str(resolve_dtype(spec.dtype, resolve_device(spec.device))).removeprefix("torch."),
        "exif_transpose": spec.exif_transpose,
        "params": dataclasses.asdict(params),
        "chunk_size": spec.chunk_size,
        "limit": spec.limit,
        "rows": plan.rows,
    }
    if spec.quantize not in (None, "none"):  # absent otherwise: earlier records still match
        record["quantize"] = spec.quantize
    return record


def load_pipeline(spec: BatchSpec) -> Pipeline:
    return load(
        spec.model,
        device=spec.device,
        dtype=spec.dtype,
        quantize=spec.quantize,
        exif_transpose=spec.exif_transpose,
        url_policy=UrlPolicy(allow_private=spec.allow_private_urls),
    )


@dataclass(frozen=True)
class RayOptions:
    """Where the Ray engine runs: a cluster address (None: start a local one) and actors."""

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0


class ErrorBudget:
    """Counts failed rows and raises :class:`ThresholdExceeded` past the threshold."""

    def __init__(self, threshold: int, failed: int = 0) -> None:
        self.threshold = threshold
        self.failed = failed
        self.first_errors: list[str] = []

    def add(self, message: str) -> None:
        self.failed += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(message)
        self.check()

    def check(self) -> None:
        if 0 <= self.threshold < self.failed:
            listed = "; ".join(self.first_errors)
            raise ThresholdExceeded(
                f"{self.failed} rows failed, over --error-threshold {self.threshold}"
                + (f" ({listed})" if listed else "")
            )
