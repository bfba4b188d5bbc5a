"""``blipserve batch INPUT OUTPUT_DIR``: flags -> :class:`BatchSpec` -> runner -> exit code.

Exit codes: 0 done; 1 a usage or input error (nothing processed); 3 more rows failed than
``--error-threshold`` allows (the finished chunks are kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from blipserve.errors import BlipserveError
from blipserve.flags import CommandParser, add_inference_flags, generation_options

if TYPE_CHECKING:
    from blipserve.batch.job import BatchSpec

EXIT_THRESHOLD = 3


def add_batch_parser(commands: argparse._SubParsersAction) -> None:
    batch = commands.add_parser(
        "batch",
        help="caption or answer questions on a folder of images and tables, resumably",
        description="Inputs: image files (.png .jpg .jpeg .bmp .gif .tiff .webp) and tables "
        "(.csv .jsonl .parquet .pqt) with an 'image' column and an optional 'text' prompt. "
        "Rerun the same command to resume a stopped run.",
    )
    add_batch_arguments(batch)
    add_inference_flags(batch)
    batch.set_defaults(run=run_batch)


def add_batch_arguments(batch: argparse.ArgumentParser) -> None:
    batch.add_argument("input", help="an input file, or a folder of them")
    batch.add_argument("output_dir", help="folder for predictions.* and the progress record")
    batch.add_argument("--format", default="azure-csv", choices=["azure-csv", "jsonl", "parquet"])
    batch.add_argument("--recursive", action="store_true", help="look in subfolders too")
    batch.add_argument("--batch-size", type=int, help="images per model call (32 GPU, 16 CPU)")
    batch.add_argument("--chunk-size", type=int, default=256, help="rows per committed part")
    batch.add_argument("--threads", type=int, default=4, help="image decoding threads")
    batch.add_argument("--max-retries", type=int, default=3, help="tries after a network error")
    batch.add_argument(
        "--error-threshold",
        type=int,
        default=-1,
        help="failed rows allowed before stopping (-1: no limit, 0: stop at the first)",
    )
    batch.add_argument("--limit", type=int, help="process only the first N rows")
    batch.add_argument("--dry-run", action="store_true", help="check inputs and count rows only")
    batch.add_argument("--restart", action="store_true", help="discard OUTPUT_DIR's progress")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = batch.add_argument_group("ray")
    ray.add_argument("--engine", default="local", choices=["local", "ray"])
    ray.add_argument("--address", help="Ray cluster address (default: start a local one)")
    ray.add_argument("--workers", type=int, default=1, help="model actors (Ray)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (Ray)")


def run_batch(args: argparse.Namespace) -> int:
    from blipserve.batch import runner  # with torch: imported when the command runs
    from blipserve.batch.job import BatchSpec, RayOptions

    spec = BatchSpec(
        input=args.input,
        output_dir=args.output_dir,
        model=args.model,
        fmt=args.format,
        recursive=args.recursive,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        exif_transpose=not args.no_exif,
        allow_private_urls=args.allow_private_urls,
        gen=generation_options(args),
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        threads=args.threads,
        max_retries=args.max_retries,
        error_threshold=args.error_threshold,
        limit=args.limit,
    )
    if args.dry_run:
        return report_dry_run(spec)
    ray = RayOptions(args.address, args.workers, args.gpus_per_worker)
    summary = runner.run(
        spec, engine=args.engine, ray=ray, restart=args.restart, progress_bar=not args.no_progress
    )
    print(json.dumps(summary.to_dict()), flush=True)
    if summary.error is not None:
        print(f"blipserve: error: {summary.error}", file=sys.stderr)
        return EXIT_THRESHOLD
    return 0


def report_dry_run(spec: BatchSpec) -> int:
    """One line per failed row, as in errors.jsonl, then ``{"files", "rows", "failed"}``;
    exit 3 where a real run would stop at ``--error-threshold``."""
    from blipserve.batch import runner  # with torch: imported when the command runs
    from blipserve.batch.sinks import error_line

    plan, summary, failed = runner.dry_run(spec)
    for result in failed:
        print(error_line(result))
    counts: dict[str, int] = {}
    for chunk in plan.chunks:
        for file_index, rows in chunk.file_rows().items():
            name = plan.names[file_index]
            counts[name] = counts.get(name, 0) + rows
    print(json.dumps({"files": counts, "rows": summary.rows, "failed": summary.failed}), flush=True)
    if 0 <= spec.error_threshold < summary.failed:
        print(
            f"blipserve: error: {summary.failed} rows would fail, over --error-threshold "
            f"{spec.error_threshold}",
            file=sys.stderr,
        )
        return EXIT_THRESHOLD
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m blipserve.batch.main``: the batch command without the other commands."""
    parser = CommandParser(prog="blipserve batch")
    add_batch_arguments(parser)
    add_inference_flags(parser)
    args = parser.parse_args(argv)
    try:
        return run_batch(args)
    except BlipserveError as exc:
        print(f"blipserve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
