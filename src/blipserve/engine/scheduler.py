"""One engine thread that every server route feeds: a bounded queue, an LRU cache of image
prefixes, and a :class:`ContinuousBatch` that new work joins at each decode step.

Callers (the HTTP handlers, on the event loop or a worker thread) decode and preprocess
images themselves, then :meth:`Scheduler.submit` :class:`Job`\\s. The engine thread loops:

1. admit waiting jobs, oldest first, while the running batch has rows to spare;
2. look up each admitted image's prefix by content hash; run the vision encoder and
   Q-Former once, batched, over the images not cached, and cache them;
3. add greedy and sampling jobs to the running batch (continuous batching, OPT and T5
   alike: a T5 job's encoder runs as it joins); run beam search jobs whole, on their own
   (their beams are re-ranked together), their tokens sent to the ``sink`` as they are
   known;
4. one decode step; each new token goes to its job's ``sink``.

Jobs leave when done, cancelled (a client disconnected) or past their deadline. A full
queue raises :class:`QueueFull` at once: the server answers 429, never piles up work.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from blipserve.engine.continuous import ContinuousBatch, DecodeRequest
from blipserve.engine.generate import FinishReason, row_budget, stream
from blipserve.engine.params import GenerationParams
from blipserve.engine.prefix_cache import PrefixCache
from blipserve.errors import BlipserveError
from blipserve.model.blip2 import Blip2Model


class QueueFull(BlipserveError):
    """The scheduler's queue is full; try again later."""


class ShuttingDown(BlipserveError):
    """The server is shutting down and takes no new work."""


@dataclass(frozen=True)
class TokenOut:
    """A new token of sample ``sample``; ``finish_reason`` is set on the sample's last."""

    sample: int
    token_id: int
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class JobFailed:
    error: Exception


JobEvent = TokenOut | JobFailed


@dataclass(eq=False)
class Job:
    """One image + prompt to continue ``params.num_return_sequences`` times."""

    image_key: str  # content hash of the image: the prefix cache key
    pixels: torch.Tensor  # (1, 3, H, W) float32, preprocessed
    prompt_ids: list[int]  # BOS first (OPT), </s> last (T5)
    params: GenerationParams
    sink: Callable[[JobEvent], None]  # called on the engine thread; must not block
    stop: Callable[[list[int]], bool] | None = None
    deadline: float = float("inf")  # time.monotonic() after which the job is dropped
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    cancelled: bool = False
    _request: DecodeRequest | None = None

    def cancel(self) -> None:
        """Stop working on this job at the next step (any thread)."""
        self.cancelled = True
        if self._request is not None:
            self._request.cancelled = True


@dataclass
class SchedulerStats:
    """Counters the metrics endpoint reads."""

    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    peak_running: int = 0  # most jobs decoded together so far


class Scheduler:
    def __init__(
        self,
        model: Blip2Model,
        *,
        eos_token_ids: list[int],
        pad_token_id: int,
        image_token_id: int | None,
        max_batch_rows: int = 32,
        max_waiting: int = 64,
        prefix_cache_size: int = 256,
        on_first_token: Callable[[float], None] | None = None,
    ) -> None:
        self.model = model
        self.options = {
            "eos_token_ids": eos_token_ids,
            "pad_token_id": pad_token_id,
            "image_token_id": image_token_id,
        }
        self.max_batch_rows = max_batch_rows
        self.max_waiting = max_waiting
        self.prefix_cache_size = prefix_cache_size
        self.on_first_token = on_first_token
        self.stats = SchedulerStats()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._prefixes = PrefixCache(prefix_cache_size)
        self._batch = ContinuousBatch(model.language_model, **self.options)
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- the callers' side ---------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def device(self) -> torch.device:
        return self.model.language_projection.weight.device

    def check(self, prompt_ids: list[int], params: GenerationParams) -> None:
        """Raise InvalidRequest now if the prompt leaves no room to generate (before
        queueing); a prompt with less room than ``max_new_tokens`` ends with "length" (T5
        has no position limit)."""
        q = self.model.config.num_query_tokens
        row_budget(self.model.language_model, q, len(prompt_ids), params.max_new_tokens)

    def submit(self, jobs: Iterable[Job]) -> None:
        """Queue ``jobs``, all or none: :class:`QueueFull` if they do not fit."""
        jobs = list(jobs)
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            if len(self._waiting) + len(jobs) > self.max_waiting:
                raise QueueFull(
                    f"{len(self._waiting)} requests are waiting (the limit is "
                    f"{self.max_waiting}); retry shortly"
                )
            self._waiting.extend(jobs)
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="blipserve-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the queued and running ones, stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._closing:
                    self._cond.wait()
                if self._closing and not self._waiting and not self._running:
                    return
                admitted = self._admit()
            try:
                self._start(admitted)
                self._step()
            except Exception as error:  # a bug or device failure: fail the work, keep serving
                for job in admitted + self._running:
                    job.sink(JobFailed(error))
                self._running = []
                self._batch = ContinuousBatch(self.model.language_model, **self.options)

    def _admit(self) -> list[Job]:
        """Pop the waiting jobs that fit beside the running rows (at least one)."""
        rows = self._batch.num_rows
        admitted: list[Job] = []
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled or time.monotonic() > job.deadline:
                self._waiting.popleft()
                continue
            n = job.params.num_return_sequences
            if (rows or admitted) and rows + n > self.max_batch_rows:
                break
            admitted.append(self._waiting.popleft())
            rows += n
        return admitted

    @torch.inference_mode()
    def _start(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        prefixes = self._prefixes_for(jobs)
        joining = []
        for job, prefix in zip(jobs, prefixes, strict=True):
            self.stats.prompt_tokens += len(job.prompt_ids)
            if job.params.num_beams > 1:
                self._run_alone(job, prefix)
                continue
            job._request = DecodeRequest(prefix, job.prompt_ids, job.params, job.stop)
            joining.append(job)
        self._batch.add([job._request for job in joining])
        self._running += joining
        self.stats.peak_running = max(self.stats.peak_running, len(self._running))

    def _prefixes_for(self, jobs: list[Job]) -> list[torch.Tensor]:
        """(Q, D) prefix per job: from the cache, or the vision encoder + Q-Former run once
        over all the distinct images not cached."""
        cache = self._prefixes
        hits, misses = cache.hits, cache.misses
        prefixes = cache.prefixes(
            [job.image_key for job in jobs],
            [job.pixels for job in jobs],
            lambda pixels: self.model.image_prefix(pixels.to(self.device)),
        )
        self.stats.prefix_cache_hits += cache.hits - hits
        self.stats.prefix_cache_misses += cache.misses - misses
        return prefixes

    def _run_alone(self, job: Job, prefix: torch.Tensor) -> None:
        """Run a (beam search) job outside the running batch, sending its tokens as they are
        known (beam search knows them only at the end). A job cancelled or past its deadline
        stops at its next token."""
        stop = None if job.stop is None else (lambda _row, ids: job.stop(ids))
        events = stream(
            self.model.language_model,
            prefix[None],
            [job.prompt_ids],
            job.params,
            **self.options,
            stop_checker=stop,
        )
        for event in events:
            if job.first_token_at is None:
                self._first_token(job)
            job.sink(TokenOut(event.sample, event.token_id, event.finish_reason))
            self.stats.generated_tokens += 1
            if job.cancelled or time.monotonic() > job.deadline:
                events.close()  # the caller is gone or has answered 408
                return

    def _step(self) -> None:
        now = time.monotonic()
        for job in self._running:
            if now > job.deadline:
                job.cancel()  # the caller has answered 408 already
        events = self._batch.step()
        by_request = {id(job._request): job for job in self._running}
        for event in events:
            job = by_request[id(event.request)]
            if job.first_token_at is None:
                self._first_token(job)
            job.sink(TokenOut(event.sample, event.token_id, event.finish_reason))
        self.stats.generated_tokens += len(events)
        self._running = [job for job in self._running if job._request in self._batch.requests]

    def _first_token(self, job: Job) -> None:
        job.first_token_at = time.monotonic()
        if self.on_first_token is not None:
            self.on_first_token(job.first_token_at - job.submitted)
