"""The local engine: a bounded prefetch pipeline feeding the model on this machine.

    reader thread ──rows──> decode threads (fetch, decode, preprocess -> (3, H, W) pixels)
          │                        │
          └── queue of futures, in row order, at most ``prefetch`` deep ──> model loop

The reader submits each row to the thread pool and puts the future on a bounded queue, so
at most ``prefetch`` rows are decoded ahead of the model and memory stays flat whatever the
input's size. The model loop takes futures in order, groups the rows that decoded into
batches of ``batch_size`` (never across a chunk boundary, so a chunk's texts do not depend
on its neighbours), runs the vision encoder + Q-Former once per batch and generates, then
commits each finished chunk.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from blipserve.api import Pipeline
from blipserve.batch.job import BatchSpec, ErrorBudget
from blipserve.batch.progress import Progress, Result
from blipserve.batch.sources import ChunkRef, Row, read_chunk
from blipserve.errors import BlipserveError, InvalidImage

RETRY_BACKOFF_S = 0.5  # doubled after each failed try, at most RETRY_BACKOFF_MAX_S
RETRY_BACKOFF_MAX_S = 8.0
_END = object()  # end of one chunk's rows on the queue
_DONE = object()  # no more chunks


def is_transient(err: InvalidImage) -> bool:
    """Whether retrying could help: network errors, timeouts, HTTP 5xx, 429 and 408."""
    return err.transient


def default_batch_size(pipe: Pipeline) -> int:
    return 32 if pipe.device.type == "cuda" else 16


@dataclass
class Decoded:
    row: Row
    pixels: torch.Tensor | None  # (3, H, W) float32, None when the row failed
    error: str | None


class ChunkProcessor:
    """Rows of chunks -> committed parts, with decoding overlapped with the model."""

    def __init__(self, pipe: Pipeline, spec: BatchSpec, names: list[str], files: list[Path]):
        self.pipe = pipe
        self.spec = spec
        self.names = names
        self.files = files
        self.progress = Progress(spec.output_dir)
        self.batch_size = spec.batch_size or default_batch_size(pipe)
        self.prefetch = max(2 * self.batch_size, 2 * spec.threads)
        self.params = pipe.params(**spec.gen)

    def run(
        self,
        refs: Iterable[ChunkRef],
        budget: ErrorBudget,
        on_rows: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[ChunkRef, list[Result]]]:
        """Process and commit each chunk, yielding it once committed."""
        futures: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        with ThreadPoolExecutor(self.spec.threads, thread_name_prefix="blipserve-decode") as pool:
            reader = threading.Thread(
                target=self._read, args=(refs, pool, futures, stop), daemon=True
            )
            reader.start()
            try:
                yield from self._model_loop(futures, budget, on_rows)
            finally:
                stop.set()
                _drain(futures)
                reader.join()
                pool.shutdown(cancel_futures=True)

    # -- reader thread -------------------------------------------------------------------

    def _read(
        self,
        refs: Iterable[ChunkRef],
        pool: ThreadPoolExecutor,
        futures: queue.Queue,
        stop: threading.Event,
    ) -> None:
        try:
            for ref in refs:
                for row in read_chunk(self.files, ref):
                    if not _put(futures, pool.submit(self._decode, row), stop):
                        return
                if not _put(futures, (_END, ref), stop):
                    return
            _put(futures, (_DONE, None), stop)
        except BaseException as err:  # an unreadable file: hand it to the model loop
            _put(futures, (_DONE, err), stop)

    def _decode(self, row: Row) -> Decoded:
        """Fetch + decode + preprocess one row in a worker thread, retrying transient errors."""
        pixels, error = self._pixels(row)
        # Drop the source (maybe megabytes of base64): the chunk keeps only row and prompt.
        return Decoded(dataclasses.replace(row, image=None), pixels, error)

    def _pixels(self, row: Row) -> tuple[torch.Tensor | None, str | None]:
        if row.error is not None:
            return None, row.error
        for attempt in range(self.spec.max_retries + 1):
            try:
                return self.pipe.image_pixels(row.image), None  # (3, H, W)
            except InvalidImage as err:
                if attempt == self.spec.max_retries or not is_transient(err):
                    tries = f" (after {attempt + 1} tries)" if attempt else ""
                    return None, err.reason + tries
            except (OSError, ValueError) as err:  # PIL conversions of odd modes
                return None, f"cannot preprocess the image: {err}"
            time.sleep(min(RETRY_BACKOFF_S * 2**attempt, RETRY_BACKOFF_MAX_S))
        raise AssertionError("unreachable")

    # -- model loop ----------------------------------------------------------------------

    def _model_loop(
        self, futures: queue.Queue, budget: ErrorBudget, on_rows: Callable[[int], None] | None
    ) -> Iterator[tuple[ChunkRef, list[Result]]]:
        decoded: list[Decoded] = []  # the current chunk's rows, in order
        texts: dict[int, str | None] = {}  # index in ``decoded`` -> text (None: failed)
        errors: dict[int, str] = {}
        batch: list[int] = []
        while True:
            item = futures.get()
            if isinstance(item, tuple):
                marker, value = item
                if marker is _DONE:
                    if isinstance(value, BaseException):
                        raise value
                    return
                self._run_batch(decoded, batch, texts, errors, budget, on_rows)
                batch = []
                ref: ChunkRef = value
                results = [self._result(ref, i, d, texts, errors) for i, d in enumerate(decoded)]
                self.progress.commit(ref, results)
                yield ref, results
                decoded, texts, errors = [], {}, {}
                continue
            d: Decoded = item.result()
            decoded.append(d)
            if d.error is not None:
                errors[len(decoded) - 1] = d.error
                budget.add(d.error)
                if on_rows:
                    on_rows(1)
                continue
            batch.append(len(decoded) - 1)
            if len(batch) == self.batch_size:
                self._run_batch(decoded, batch, texts, errors, budget, on_rows)
                batch = []

    def _run_batch(
        self,
        decoded: list[Decoded],
        batch: list[int],
        texts: dict[int, str | None],
        errors: dict[int, str],
        budget: ErrorBudget,
        on_rows: Callable[[int], None] | None,
    ) -> None:
        if not batch:
            return
        rows = [decoded[i] for i in batch]
        try:
            outputs = self.generate(rows)
        except BlipserveError:  # e.g. one prompt too long: find which row(s), one by one
            outputs = []
            for d in rows:
                try:
                    outputs.append(self.generate([d])[0])
                except BlipserveError as err:
                    outputs.append(err)
        for i, out in zip(batch, outputs, strict=True):
            if isinstance(out, BlipserveError):
                errors[i] = str(out)
                budget.add(str(out))
            else:
                texts[i] = out
        for i in batch:
            decoded[i].pixels = None  # free the pixels now, not at the end of the chunk
        if on_rows:
            on_rows(len(batch))

    def generate(self, rows: list[Decoded]) -> list[str]:
        """Texts for decoded rows: the same as ``Pipeline.generate`` on their images."""
        pixels = torch.stack([d.pixels for d in rows])  # (B, 3, H, W)
        prompts = [d.row.prompt or "" for d in rows]
        outputs = self.pipe.generate_from_pixels(pixels, prompts, self.params)
        return [row[0].text for row in outputs]

    def _result(
        self, ref: ChunkRef, i: int, d: Decoded, texts: dict[int, str | None], errors: dict
    ) -> Result:
        file_index, row = ref.position(i)
        assert d.row.row == row, (ref, i, d.row.row)
        name = self.names[file_index]
        if i in errors:
            return Result(name, d.row.row, None, errors[i])
        return Result(name, d.row.row, texts[i])


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item`` on the bounded queue unless ``stop`` is set first."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, Future):
            item.cancel()
