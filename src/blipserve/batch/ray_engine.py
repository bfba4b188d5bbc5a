"""The Ray engine: the same chunks, processed by a pool of model actors with Ray Data.

    from_items(pending chunk refs) -> map_batches(ChunkWorker, batch_size=1,
        concurrency=workers, num_gpus=gpus_per_worker) -> counts back to the driver

Each actor loads the model once and runs the local engine's :class:`ChunkProcessor` on one
chunk per call: it reads the chunk's rows from the input file (starting at the chunk's
byte offset), decodes them on its own threads, generates, and commits the part itself.
Workers and driver therefore need one shared file system for the inputs and OUTPUT_DIR.
The driver only counts rows and failures as chunks come back and merges at the end, so
the output is byte for byte the local engine's, and resuming works the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from blipserve.batch.job import BatchSpec, ErrorBudget, Plan, RayOptions, load_pipeline
from blipserve.batch.local import ChunkProcessor
from blipserve.batch.sources import ChunkRef

MAX_ERRORS_REPORTED = 5  # error messages each chunk sends back to the driver


class ChunkWorker:
    """A Ray Data actor: loads the model once, then processes and commits whole chunks."""

    def __init__(self, spec: dict[str, Any], names: list[str], files: list[str]) -> None:
        batch_spec = BatchSpec(**spec)
        paths = [Path(f) for f in files]
        self.processor = ChunkProcessor(load_pipeline(batch_spec), batch_spec, names, paths)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fields = [f.name for f in dataclasses.fields(ChunkRef)]
        refs = [
            ChunkRef(**{name: int(batch[name][i]) for name in fields})
            for i in range(len(batch["file_index"]))
        ]
        rows, failed, errors = [], [], []
        for _, results in self.processor.run(refs, ErrorBudget(-1)):
            messages = [r.error for r in results if r.error is not None]
            rows.append(len(results))
            failed.append(len(messages))
            errors.append(json.dumps(messages[:MAX_ERRORS_REPORTED]))
        return {"rows": np.array(rows), "failed": np.array(failed), "errors": np.array(errors)}


def run_ray(
    spec: BatchSpec,
    plan: Plan,
    pending: list[ChunkRef],
    budget: ErrorBudget,
    options: RayOptions,
    advance: Callable[[int], None],
) -> None:
    """Process ``pending`` on Ray; raises ThresholdExceeded once too many rows failed
    (chunks already running still commit; the error threshold acts per chunk here)."""
    import ray

    if not pending:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
    try:
        items = [dataclasses.asdict(ref) for ref in pending]
        dataset = ray.data.from_items(items).map_batches(
            ChunkWorker,
            fn_constructor_kwargs={
                "spec": _absolute(spec).to_dict(),
                "names": plan.names,
                "files": [str(f.resolve()) for f in plan.files],
            },
            batch_size=1,
            batch_format="numpy",
            concurrency=options.workers,
            num_gpus=options.gpus_per_worker or None,
        )
        for result in dataset.iter_rows():
            advance(int(result["rows"]))
            messages = json.loads(str(result["errors"]))
            for i in range(int(result["failed"])):
                budget.add(messages[i] if i < len(messages) else "(more errors in this chunk)")
    finally:
        if started:
            ray.shutdown()


def _absolute(spec: BatchSpec) -> BatchSpec:
    """Workers do not share the driver's working directory: pass absolute paths."""
    return dataclasses.replace(
        spec, input=str(Path(spec.input).resolve()), output_dir=str(Path(spec.output_dir).resolve())
    )
