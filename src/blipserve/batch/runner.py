"""One batch run, whichever engine does the work: plan, resume, process, merge, summarise."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from blipserve.batch.job import (
    BatchSpec,
    ErrorBudget,
    Plan,
    RayOptions,
    ThresholdExceeded,
    load_pipeline,
    make_plan,
    manifest,
    resolve_params,
)
from blipserve.batch.local import ChunkProcessor
from blipserve.batch.progress import Progress, Result
from blipserve.batch.ray_engine import run_ray
from blipserve.batch.sinks import write_output
from blipserve.batch.sources import Row, read_chunk
from blipserve.errors import InvalidImage
from blipserve.processing.images import check_image
from blipserve.processing.limits import DEFAULT_LIMITS


@dataclass
class Summary:
    rows: int
    done: int = 0  # rows processed by this run
    failed: int = 0  # failed rows in the whole output
    skipped: int = 0  # rows committed by an earlier run of the same command
    seconds: float = 0.0
    output: str | None = None
    error: str | None = None  # why the run stopped early

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "done": self.done,
            "failed": self.failed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
            "output": self.output,
            "error": self.error,
        }


def dry_run(spec: BatchSpec) -> tuple[Plan, Summary, list[Result]]:
    """Validate the inputs, count rows and check every row's image up to its pixels
    (:func:`check_image`: size, format, pixel count; URLs by form), giving the failed rows
    with the errors a real run writes. Loads no model, fetches nothing, writes nothing."""
    spec.validate()
    plan = make_plan(spec)
    failed: list[Result] = []
    with ThreadPoolExecutor(spec.threads, thread_name_prefix="blipserve-check") as pool:
        for ref in plan.chunks:
            rows = list(read_chunk(plan.files, ref))
            for i, error in enumerate(pool.map(row_error, rows)):
                if error is not None:
                    file_index, row = ref.position(i)
                    failed.append(Result(plan.names[file_index], row, None, error))
    return plan, Summary(rows=plan.rows, failed=len(failed)), failed


def row_error(row: Row) -> str | None:
    """The error a run would report for ``row`` before decoding its pixels, or None. The
    limits are the pipeline's defaults, as :func:`~blipserve.batch.job.load_pipeline` sets."""
    if row.error is not None:
        return row.error
    try:
        check_image(row.image, limits=DEFAULT_LIMITS)
    except InvalidImage as err:
        return err.reason
    return None


def run(
    spec: BatchSpec,
    *,
    engine: str = "local",
    ray: RayOptions | None = None,
    restart: bool = False,
    progress_bar: bool = True,
) -> Summary:
    """Process every pending chunk, then merge the output. When more rows fail than
    ``--error-threshold`` allows, stops (committed chunks are kept), merges nothing and
    says why in ``Summary.error``."""
    spec.validate()
    plan = make_plan(spec)
    params = resolve_params(spec)
    progress = Progress(spec.output_dir)
    with progress.lock():
        progress.start(manifest(spec, plan, params), restart=restart)
        committed = [c for c in plan.chunks if progress.is_committed(c)]
        pending = [c for c in plan.chunks if not progress.is_committed(c)]
        summary = Summary(rows=plan.rows, skipped=sum(c.n_rows for c in committed))
        budget = ErrorBudget(spec.error_threshold, progress.count_errors(committed))
        bar = _Bar(plan.rows, summary.skipped, progress_bar)
        processor = _local_processor(spec, plan) if engine == "local" and pending else None
        start = time.perf_counter()  # after loading the model: images/s is inference only
        try:
            budget.check()
            with bar:
                if engine == "ray":
                    run_ray(spec, plan, pending, budget, ray or RayOptions(), bar.advance)
                elif processor is not None:
                    for _ in processor.run(pending, budget, bar.advance):
                        pass
        except ThresholdExceeded as err:
            summary.error = str(err)
        summary.seconds = time.perf_counter() - start
        summary.done, summary.failed = bar.count, budget.failed
        if summary.error is None:
            settings = {"model": spec.model, "params": dataclasses.asdict(params)}
            path = write_output(spec.fmt, progress.output_dir, _merged(progress, plan), settings)
            summary.output = str(path)
    return summary


def _local_processor(spec: BatchSpec, plan: Plan) -> ChunkProcessor:
    return ChunkProcessor(load_pipeline(spec), spec, plan.names, plan.files)


def _merged(progress: Progress, plan: Plan) -> Iterator[Result]:
    for ref in plan.chunks:
        yield from progress.read_part(ref)


class _Bar:
    """Counts rows done; shows a tqdm bar on stderr (rows, images/s, ETA) when enabled."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.initial, self.enabled = total, initial, enabled
        self.tqdm: Any = None
        self.count = 0

    def __enter__(self) -> _Bar:
        if self.enabled:
            self.tqdm = tqdm(
                total=self.total, initial=self.initial, unit="img", desc="batch", smoothing=0.1
            )
        return self

    def advance(self, n: int) -> None:
        self.count += n
        if self.tqdm is not None:
            self.tqdm.update(n)

    def __exit__(self, *exc: object) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
