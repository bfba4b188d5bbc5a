"""The public face: ``blipserve.load()`` and :class:`Pipeline`.

The CLI, the server and the batch runner are thin clients of a :class:`Pipeline`; none of
them holds model or generation logic. A pipeline owns the four pieces a checkpoint
directory describes (model, tokenizer, image processor, generation defaults) and
connects them: sources -> pixels -> prefix embeddings -> engine -> text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from blipserve.engine.generate import SequenceOutput, generate, stream
from blipserve.engine.params import GenerationParams
from blipserve.errors import InvalidRequest, UnsupportedModel
from blipserve.model.blip2 import Blip2Config, Blip2Model
from blipserve.model.retrieval import is_retrieval_config
from blipserve.processing.fetch import UrlPolicy
from blipserve.processing.image_processor import ImageProcessor
from blipserve.processing.images import ImageLimits, load_images
from blipserve.processing.prompts import DEFAULT_VQA_TEMPLATE, chat_prompt, vqa_prompt
from blipserve.processing.tokenizer import Tokenizer
from blipserve.resolve import resolve_checkpoint
from blipserve.weights import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Generation:
    """One generated continuation."""

    text: str
    token_ids: list[int]  # new tokens only; the eos token is included when produced
    finish_reason: FinishReason


@dataclass(frozen=True)
class CheckpointDefaults:
    """Token ids the checkpoint's ``generation_config.json`` / ``config.json`` fix."""

    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    image_token_id: int | None
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, directory: Path, config: Blip2Config) -> CheckpointDefaults:
        path = directory / "generation_config.json"
        gen = json.loads(path.read_text()) if path.is_file() else {}
        eos = gen.get("eos_token_id", config.text.eos_token_id)
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        pad = gen.get("pad_token_id", config.text.pad_token_id)
        params = {k: gen[k] for k in GenerationParams.checkpoint_keys() if k in gen}
        return cls(eos_ids, pad, config.image_token_index, params)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise InvalidRequest(f"device {device!r} is not a valid torch device") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest(f"device {device!r} was asked for, but CUDA is not available here")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that has it, else float16 on GPU, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise InvalidRequest(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def load(
    model: str = "demo",
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    exif_transpose: bool = True,
    image_limits: ImageLimits | None = None,
    url_policy: UrlPolicy | None = None,
) -> Pipeline:
    """Load a BLIP-2 checkpoint (``demo``, a local directory or a Hub id) into a Pipeline."""
    directory = resolve_checkpoint(model)
    target = resolve_device(device)
    raw_config = json.loads((directory / "config.json").read_text())
    if is_retrieval_config(raw_config):
        raise UnsupportedModel(
            f"{model} is an image-text matching checkpoint (Blip2ForImageTextRetrieval): it "
            "scores images against texts but writes no text; load it with "
            "blipserve.load_matcher"
        )
    config = Blip2Config.from_hf(raw_config)
    blip2 = load_model(directory, config, device=target, dtype=resolve_dtype(dtype, target))
    return Pipeline(
        blip2,
        Tokenizer.from_pretrained(directory),
        ImageProcessor.from_pretrained(directory),
        CheckpointDefaults.read(directory, config),
        name=model,
        exif_transpose=exif_transpose,
        image_limits=image_limits or ImageLimits(),
        url_policy=url_policy,
    )


class Pipeline:
    """Image(s) + prompt(s) -> text, with every generation option of the engine.

    ``gen`` keyword arguments are :class:`GenerationParams` fields (``max_new_tokens``,
    ``num_beams``, ``do_sample``, ``temperature``, ``top_p``, ``stop``, ...); unknown ones
    raise :class:`InvalidRequest`.
    """

    def __init__(
        self,
        model: Blip2Model,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        defaults: CheckpointDefaults,
        *,
        name: str = "",
        exif_transpose: bool = True,
        image_limits: ImageLimits | None = None,
        url_policy: UrlPolicy | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.defaults = defaults
        self.name = name
        self.exif_transpose = exif_transpose
        self.image_limits = image_limits or ImageLimits()
        self.url_policy = url_policy  # None: image URLs are fetched from public addresses only

    @property
    def device(self) -> torch.device:
        return self.model.language_projection.weight.device

    # -- inputs ------------------------------------------------------------------------

    def load_images(self, images: Any) -> list[Image.Image]:
        """Any image sources -> decoded PIL images, with this pipeline's limits and EXIF
        setting; a bad one raises :class:`InvalidImage` naming its row."""
        return load_images(
            _as_list(images),
            limits=self.image_limits,
            exif_transpose=self.exif_transpose,
            url_policy=self.url_policy,
        )

    def preprocess(self, images: Any) -> torch.Tensor:
        """Any image sources -> (B, 3, H, W) float32 pixel values."""
        return self.image_processor(self.load_images(images))

    @torch.inference_mode()
    def encode_images(self, images: Any) -> torch.Tensor:
        """Image sources -> (B, Q, d_lm) prefix embeddings (vision encoder + Q-Former)."""
        pixels = self.preprocess(images).to(self.device)
        return self.model.encode_images(pixels)

    def params(self, **gen: Any) -> GenerationParams:
        """Generation options over the checkpoint's defaults, validated."""
        params = GenerationParams.from_dict({**self.defaults.params, **gen})
        params.validate()
        return params

    # -- generation --------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, images: Any, prompts: str | Sequence[str | None] | None = None, **gen: Any
    ) -> list[list[Generation]]:
        """Per image, ``num_return_sequences`` generations for its prompt."""
        sources = _as_list(images)
        texts = _prompts_for(sources, prompts)
        params = self.params(**gen)
        prompt_ids = self.tokenizer.encode_batch(texts)
        prefix = self.encode_images(sources)  # (B, Q, d_lm), once per image
        lm = self.model.language_model
        outputs = generate(lm, prefix, prompt_ids, params, **self._engine_options(params))
        return [[self._to_generation(seq, params) for seq in row] for row in outputs]

    def caption(
        self, images: Any, prompt: str | Sequence[str | None] | None = None, **gen: Any
    ) -> list[str]:
        """Captions, one per image; ``prompt`` (e.g. ``"a photo of"``) primes each caption."""
        return [row[0].text for row in self.generate(images, prompt, **gen)]

    def ask(
        self, image: Any, question: str, *, template: str = DEFAULT_VQA_TEMPLATE, **gen: Any
    ) -> str:
        """Answer a question about one image (``"Question: {question} Answer:"``)."""
        return self.generate([image], [vqa_prompt(question, template)], **gen)[0][0].text

    def chat(self, image: Any, messages: Sequence[dict], **gen: Any) -> str:
        """Reply to the last user message, the history flattened into one prompt."""
        return self.generate([image], [chat_prompt(messages)], **gen)[0][0].text

    @torch.inference_mode()
    def stream(self, image: Any, prompt: str | None = None, **gen: Any) -> Iterator[str]:
        """Text deltas for one image as tokens are produced (greedy or sampling)."""
        params = self.params(**gen)
        if params.num_beams > 1 or params.num_return_sequences > 1:
            raise InvalidRequest("streaming needs num_beams=1 and num_return_sequences=1")
        prefix = self.encode_images([image])
        prompt_ids = self.tokenizer.encode_batch([prompt or ""])
        decoder = IncrementalDecoder(self.tokenizer, params.stop)
        lm = self.model.language_model
        for event in stream(lm, prefix, prompt_ids, params, **self._engine_options(params)):
            delta = decoder.push(event.token_id)
            if delta:
                yield delta
        if tail := decoder.flush():
            yield tail

    # -- outputs -----------------------------------------------------------------------

    def _engine_options(self, params: GenerationParams) -> dict[str, Any]:
        """The checkpoint's token ids, and a stop-string check when stop strings are set."""
        stop = self.stop_check(params.stop)
        stop_checker = None if stop is None else (lambda _row, new_ids: stop(new_ids))
        return {
            "eos_token_ids": list(self.defaults.eos_token_ids),
            "pad_token_id": self.defaults.pad_token_id,
            "image_token_id": self.defaults.image_token_id,
            "stop_checker": stop_checker,
        }

    def stop_check(self, stops: Sequence[str]) -> Callable[[list[int]], bool] | None:
        """new token ids -> has one of ``stops`` appeared in their text? (None: no stops)"""
        if not stops:
            return None
        return lambda new_ids: any(s in self.tokenizer.decode(new_ids) for s in stops)

    def _to_generation(self, seq: SequenceOutput, params: GenerationParams) -> Generation:
        text = truncate_at_stop(self.tokenizer.decode(seq.token_ids), params.stop)
        return Generation(text=text, token_ids=list(seq.token_ids), finish_reason=seq.finish_reason)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut ``text`` before the first stop string it contains (the stop is not returned)."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut].strip()


class IncrementalDecoder:
    """Token ids -> text deltas, holding back incomplete UTF-8 and possible stop prefixes."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = truncate_at_stop(self.tokenizer.decode(self.ids), self.stops)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        # Trailing whitespace waits for the next word: the final text is stripped.
        safe = text[: len(text) - self._held_back(text)].rstrip()
        return self._emit(safe)

    def flush(self) -> str:
        return self._emit(truncate_at_stop(self.tokenizer.decode(self.ids), self.stops))

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that could start a stop string."""
        return max(
            (n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0
        )

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent):  # decode stripped differently: resend nothing
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def _as_list(images: Any) -> list[Any]:
    return list(images) if isinstance(images, list | tuple) else [images]


def _prompts_for(sources: list[Any], prompts: str | Sequence[str | None] | None) -> list[str]:
    if prompts is None or isinstance(prompts, str):
        return [prompts or ""] * len(sources)
    prompts = list(prompts)
    if len(prompts) != len(sources):
        raise InvalidRequest(f"got {len(sources)} images but {len(prompts)} prompts")
    return [p or "" for p in prompts]
