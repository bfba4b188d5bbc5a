"""What every route shares: image rows -> scheduler jobs -> generations, on the event loop.

Routes parse their protocol into (image source, prompt) rows plus generation options and
call :meth:`ModelService.generate` or :meth:`ModelService.stream`. Image decoding (and URL
fetching) runs on worker threads, one per row; model work runs on the scheduler's engine
thread; the event loop only waits. A request with a bad row fails whole, naming the row
(``InvalidImage.row``): the same policy on every route, documented in docs/server.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import torch

from blipserve.api import Pipeline
from blipserve.engine.generate import FinishReason
from blipserve.engine.params import GenerationParams
from blipserve.engine.prefix_cache import pixels_key
from blipserve.engine.scheduler import Job, JobEvent, JobFailed, Scheduler, TokenOut
from blipserve.errors import InvalidRequest
from blipserve.outputs import Generation, IncrementalDecoder, stop_check, to_generation
from blipserve.processing.fetch import UrlPolicy


class RequestTimeout(InvalidRequest):
    """The request did not finish within the server's time limit."""


@dataclass(frozen=True)
class Row:
    image: Any  # base64 text, data: URL, http(s) URL or bytes
    prompt: str


@dataclass(frozen=True)
class StreamDelta:
    """New text of a streamed sequence; the last delta carries the finish reason."""

    text: str  # may be empty on the last delta
    tokens: int  # generated so far, the eos token included when produced
    finish_reason: FinishReason | None = None


class ModelService:
    def __init__(
        self,
        pipe: Pipeline,
        scheduler: Scheduler,
        *,
        url_policy: UrlPolicy,
        request_timeout: float,
        max_rows: int,
    ) -> None:
        self.pipe = pipe
        self.scheduler = scheduler
        self.url_policy = url_policy
        self.request_timeout = request_timeout
        self.max_rows = max_rows

    def params(self, options: dict[str, Any] | None) -> GenerationParams:
        """Request options over the checkpoint's defaults; InvalidRequest names a bad one.

        Options are ``GenerationParams`` fields (transformers' ``generate`` names), with the
        Python API's sampling rule: ``temperature``, ``top_p`` or ``top_k`` without
        ``do_sample`` turn sampling on, ``temperature: 0`` means greedy."""
        return self.pipe.params(**(options or {}))

    async def generate(
        self, rows: Sequence[Row], params: GenerationParams
    ) -> list[list[Generation]]:
        """Per row, ``params.num_return_sequences`` generations."""
        deadline = time.monotonic() + self.request_timeout
        jobs, sinks = await self._jobs(rows, params, deadline)
        try:
            async with asyncio.timeout(self._remaining(deadline)):
                collected = [await sink.collect() for sink in sinks]
        except TimeoutError:
            raise RequestTimeout(self._timeout_message()) from None
        finally:
            for job in jobs:
                job.cancel()  # no-op when finished; frees the batch on timeout or disconnect
        return [
            [self._generation(ids, reason, params) for ids, reason in samples]
            for samples in collected
        ]

    async def stream(self, row: Row, params: GenerationParams) -> AsyncIterator[StreamDelta]:
        """Text deltas of one row's only sequence, as the tokens come; the last one (its
        text possibly empty) has the finish reason."""
        deadline = time.monotonic() + self.request_timeout
        (job,), (sink,) = await self._jobs([row], params, deadline)
        decoder = IncrementalDecoder(self.pipe.tokenizer, params.stop)
        tokens = 0
        try:
            async with asyncio.timeout(self._remaining(deadline)):
                async for token in sink.tokens():
                    tokens += 1
                    if delta := decoder.push(token):
                        yield StreamDelta(delta, tokens)
            yield StreamDelta(decoder.flush(), tokens, sink.reasons[0] or "length")
        except TimeoutError:
            raise RequestTimeout(self._timeout_message()) from None
        finally:
            job.cancel()

    # -- rows -> jobs ----------------------------------------------------------------------

    async def _jobs(
        self, rows: Sequence[Row], params: GenerationParams, deadline: float
    ) -> tuple[list[Job], list[_Sink]]:
        if not rows:
            raise InvalidRequest("the request has no rows; send at least one image")
        if len(rows) > self.max_rows:
            raise InvalidRequest(f"{len(rows)} rows in one request; the limit is {self.max_rows}")
        prompt_ids = self.pipe.tokenizer.encode_batch([row.prompt for row in rows])
        for ids in prompt_ids:
            self.scheduler.check(ids, params)
        decoded = await asyncio.gather(
            *(anyio.to_thread.run_sync(self._pixels, row.image, i) for i, row in enumerate(rows)),
            return_exceptions=True,
        )
        for outcome in decoded:  # the first bad row in row order, whichever failed first
            if isinstance(outcome, BaseException):
                raise outcome
        pixels = [outcome for outcome in decoded if not isinstance(outcome, BaseException)]
        loop = asyncio.get_running_loop()
        sinks = [_Sink(loop, params.num_return_sequences) for _ in rows]
        stop = stop_check(self.pipe.tokenizer, params.stop)
        jobs = [
            Job(key, tensor, ids, params, sink.put, stop=stop, deadline=deadline)
            for (key, tensor), ids, sink in zip(pixels, prompt_ids, sinks, strict=True)
        ]
        self.scheduler.submit(jobs)
        return jobs, sinks

    def _pixels(self, source: Any, row: int) -> tuple[str, torch.Tensor]:
        """-> (content hash, (1, 3, H, W) pixels); InvalidImage names ``row``."""
        # allow_paths=False: a client's string never names a file on this machine.
        pixels = self.pipe.image_pixels(
            source, row=row, url_policy=self.url_policy, allow_paths=False
        )[None]
        return pixels_key(pixels), pixels

    def _generation(
        self, ids: list[int], reason: FinishReason, params: GenerationParams
    ) -> Generation:
        return to_generation(self.pipe.tokenizer, ids, reason, params.stop)

    def _remaining(self, deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    def _timeout_message(self) -> str:
        return (
            f"the request did not finish within {self.request_timeout:g} s "
            "(--request-timeout); retry with fewer images or tokens"
        )


class _Sink:
    """One job's events, handed from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, samples: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self.ids: list[list[int]] = [[] for _ in range(samples)]
        self.reasons: list[str | None] = [None] * samples

    def put(self, event: JobEvent) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def tokens(self) -> AsyncIterator[int]:
        """Sample 0's tokens as they come (streaming asks for one sample only)."""
        while any(reason is None for reason in self.reasons):
            event = await self.queue.get()
            if isinstance(event, JobFailed):
                raise event.error
            assert isinstance(event, TokenOut)
            self.ids[event.sample].append(event.token_id)
            self.reasons[event.sample] = event.finish_reason
            if event.sample == 0:
                yield event.token_id

    async def collect(self) -> list[tuple[list[int], str]]:
        async for _ in self.tokens():
            pass
        return [
            (ids, reason or "length") for ids, reason in zip(self.ids, self.reasons, strict=True)
        ]
