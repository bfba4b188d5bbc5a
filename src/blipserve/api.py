"""The public face: ``blipserve.load()`` and :class:`Pipeline`.

A pipeline owns the four pieces a checkpoint directory describes (model, tokenizer, image
processor, generation defaults) and is the one path from pixels to text that the CLI, the
server and the batch runner share:

    image sources --load_images/image_pixels--> images --preprocess--> (B, 3, H, W) pixels
        --image_prefix--> (B, Q, d_lm) prefix --generate_from_prefix--> list[list[Generation]]

``generate`` runs all of it; ``generate_from_pixels`` and ``generate_from_prefix`` enter
later, for callers that decode images themselves (the batch runner) or cache prefixes (the
server's scheduler, which decodes through :mod:`blipserve.outputs` like the rest).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from blipserve.engine.conversation import ConversationCache
from blipserve.engine.generate import generate, stream
from blipserve.engine.params import MAX_NEW_TOKENS, GenerationParams
from blipserve.engine.prefix_cache import PrefixCache, pixels_key
from blipserve.errors import HistoryTruncated, InvalidRequest, UnsupportedModel
from blipserve.generation_config import CheckpointDefaults
from blipserve.model.blip2 import Blip2Config, Blip2Model
from blipserve.model.packed import pack_linears
from blipserve.model.retrieval import is_retrieval_config
from blipserve.outputs import Generation, IncrementalDecoder, StopCheck, stop_check, to_generation
from blipserve.processing.fetch import UrlPolicy
from blipserve.processing.image_processor import ImageProcessor
from blipserve.processing.images import load_image, load_images
from blipserve.processing.limits import ImageLimits
from blipserve.processing.prompts import DEFAULT_VQA_TEMPLATE, fit_chat_prompt, vqa_prompt
from blipserve.processing.tokenizer import Tokenizer
from blipserve.resolve import resolve_checkpoint, resolve_device, resolve_dtype
from blipserve.weights import QUANTIZATIONS, load_model

__all__ = ["Generation", "Pipeline", "load"]
PREFIX_CACHE_SIZE = 32  # image prefixes a pipeline keeps for follow-up questions


def load(
    model: str = "demo",
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    exif_transpose: bool = True,
    image_limits: ImageLimits | None = None,
    url_policy: UrlPolicy | None = None,
    quantize: str | None = None,
    for_training: bool = False,
) -> Pipeline:
    """Load a BLIP-2 checkpoint (``demo``, a local directory or a Hub id) into a Pipeline.

    ``dtype="auto"``: bfloat16 on a GPU, and on a CPU that computes bfloat16 natively
    (AVX512-BF16 or AMX); float32 on other CPUs (see :func:`blipserve.resolve.resolve_dtype`).
    ``dtype="float32"`` by name is the exact path: token-identical to transformers.
    ``quantize="int8"``: int8 weights for the language model (half of bfloat16's memory,
    faster decoding on a CPU); outputs differ slightly from the unquantized model's.
    On a CPU, linear layers get their weights pre-packed for oneDNN
    (:mod:`blipserve.model.packed`): bfloat16 ones always, float32 ones under ``auto``
    (faster; sums in another order, so tokens may rarely differ from transformers');
    ``for_training=True`` keeps every module plain
    (differentiable, with a complete state dict): what the trainers load.
    """
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
    if quantize not in (None, "none", *QUANTIZATIONS):
        raise InvalidRequest(f"quantize must be one of {', '.join(QUANTIZATIONS)} or none")
    blip2 = load_model(
        directory,
        config,
        device=target,
        dtype=resolve_dtype(dtype, target, float16_ok=not config.is_encoder_decoder),
        quantize=None if quantize == "none" else quantize,
    )
    if not for_training and target.type == "cpu":
        # float32 named by the caller keeps transformers' kernels: exact parity
        auto = dtype is None or dtype == "auto"
        pack_linears(blip2, (torch.bfloat16, torch.float32) if auto else (torch.bfloat16,))
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
        prefix_cache_size: int = PREFIX_CACHE_SIZE,
        reuse_turns: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.defaults = defaults
        self.name = name
        self.exif_transpose = exif_transpose
        self.image_limits = image_limits or ImageLimits()
        self.url_policy = url_policy  # None: image URLs are fetched from public addresses only
        self.prefix_cache = PrefixCache(prefix_cache_size)
        # The last single-image generation's K/V: a chat follow-up prefills only new tokens.
        self.conversation = ConversationCache() if reuse_turns else None

    @property
    def device(self) -> torch.device:
        return self.model.language_projection.weight.device

    @property
    def context_length(self) -> int:
        """Positions the language model has: image queries + BOS + prompt + new tokens.
        T5 (relative positions) has no limit: its decoder's, the most new tokens asked for."""
        if self.model.config.is_encoder_decoder:
            return MAX_NEW_TOKENS
        return self.model.config.text.max_position_embeddings

    def room(self, prompt: str) -> int:
        """New tokens the model's positions leave after the image queries and ``prompt``
        (BOS included); 0 or less: the prompt alone does not fit. T5's encoder takes the
        prompt apart from the new tokens: every prompt leaves :attr:`context_length`."""
        if self.model.config.is_encoder_decoder:
            return self.context_length
        used = self.model.config.num_query_tokens + len(self.tokenizer.encode(prompt))
        return self.context_length - used

    def fit_chat(self, messages: Sequence[dict], max_new_tokens: int) -> tuple[str, int]:
        """The chat prompt of the newest turns that leave room for ``max_new_tokens``, and
        how many older turns it leaves out (the last user message is always kept)."""
        return fit_chat_prompt(messages, lambda prompt: self.room(prompt) >= max_new_tokens)

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

    def image_pixels(
        self,
        source: Any,
        *,
        row: int | None = None,
        url_policy: UrlPolicy | None = None,
        allow_paths: bool = True,
    ) -> torch.Tensor:
        """One image source -> (3, H, W) float32 pixels, with this pipeline's limits and
        EXIF setting. ``url_policy`` overrides the pipeline's; ``allow_paths=False`` refuses
        file paths (a server's clients never name files); a bad image raises
        :class:`InvalidImage` naming ``row``."""
        image = load_image(
            source,
            row=row,
            limits=self.image_limits,
            exif_transpose=self.exif_transpose,
            url_policy=url_policy or self.url_policy,
            allow_paths=allow_paths,
        )
        return self.image_processor.preprocess_one(image)

    def preprocess(self, images: Any) -> torch.Tensor:
        """Any image sources -> (B, 3, H, W) float32 pixel values."""
        return self.image_processor(self.load_images(images))

    @torch.inference_mode()
    def image_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, Q, d_lm) prefix embeddings (vision encoder + Q-Former),
        on this pipeline's device, in the model dtype. Images seen lately (the same pixels:
        a chat follow-up, another question) come from the prefix cache."""
        return self._prefix([pixels_key(image) for image in pixels], pixels)

    def _prefix(self, keys: list[str], pixels: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.prefix_cache.prefixes(keys, list(pixels), self._encode))

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.image_prefix(pixels.to(self.device))

    def generation_config(self) -> dict[str, Any]:
        """The ``generation_config.json`` content this pipeline's checkpoint carried."""
        return self.defaults.to_dict(self.tokenizer.bos_token_id)

    def params(self, **gen: Any) -> GenerationParams:
        """Generation options over the checkpoint's defaults, validated; a ``temperature``,
        ``top_p`` or ``top_k`` without ``do_sample`` turns sampling on, ``temperature=0``
        means greedy (:func:`~blipserve.engine.params.sampling_rule`)."""
        return GenerationParams.resolve(self.defaults.params, gen)

    # -- generation --------------------------------------------------------------------

    def generate(
        self, images: Any, prompts: str | Sequence[str | None] | None = None, **gen: Any
    ) -> list[list[Generation]]:
        """Per image, ``num_return_sequences`` generations for its prompt."""
        sources = _as_list(images)
        texts = _prompts_for(sources, prompts)
        params = self.params(**gen)
        return self.generate_from_pixels(self.preprocess(sources), texts, params)

    def generate_from_pixels(
        self, pixels: torch.Tensor, prompts: Sequence[str], params: GenerationParams
    ) -> list[list[Generation]]:
        """(B, 3, H, W) pixels and B prompts -> per image, its generations. One image: a
        follow-up about it reuses the previous turn's computed positions."""
        keys = [pixels_key(image) for image in pixels]
        with torch.inference_mode():
            prefix = self._prefix(keys, pixels)
        return self._generate(prefix, prompts, params, keys)

    def generate_from_prefix(
        self, prefix: torch.Tensor, prompts: Sequence[str], params: GenerationParams
    ) -> list[list[Generation]]:
        """(B, Q, d_lm) prefix embeddings and B prompts -> per image, its generations."""
        return self._generate(prefix, prompts, params, None)

    @torch.inference_mode()
    def _generate(
        self,
        prefix: torch.Tensor,
        prompts: Sequence[str],
        params: GenerationParams,
        image_keys: list[str] | None,
    ) -> list[list[Generation]]:
        prompt_ids = self.tokenizer.encode_batch(list(prompts))
        lm = self.model.language_model
        options = self._engine_options(params) | self._follow_up(image_keys)
        outputs = generate(lm, prefix, prompt_ids, params, **options)
        return [
            [to_generation(self.tokenizer, s.token_ids, s.finish_reason, params.stop) for s in row]
            for row in outputs
        ]

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
        """Reply to the last user message, the history flattened into one prompt.

        A history too long for the model's positions (with room for ``max_new_tokens``)
        keeps its newest turns and warns with :class:`HistoryTruncated` (Python shows it
        once per process); a last message too long on its own gets a shorter answer
        (finish reason "length") or, leaving no room at all, :class:`InvalidRequest`.
        """
        params = self.params(**gen)
        prompt, dropped = self.fit_chat(messages, params.max_new_tokens)
        if dropped:
            warnings.warn(
                f"the chat history is longer than {self.name or 'the model'}'s "
                f"{self.context_length} positions allow with max_new_tokens="
                f"{params.max_new_tokens}: the oldest turns are left out",
                HistoryTruncated,
                stacklevel=2,
            )
        return self.generate_from_pixels(self.preprocess([image]), [prompt], params)[0][0].text

    @torch.inference_mode()
    def stream(self, image: Any, prompt: str | None = None, **gen: Any) -> Iterator[str]:
        """Text deltas for one image as tokens are produced (greedy or sampling)."""
        params = self.params(**gen)
        if params.num_beams > 1 or params.num_return_sequences > 1:
            raise InvalidRequest("streaming needs num_beams=1 and num_return_sequences=1")
        pixels = self.preprocess([image])
        keys = [pixels_key(pixels[0])]
        prefix = self._prefix(keys, pixels)  # (1, Q, d_lm)
        prompt_ids = self.tokenizer.encode_batch([prompt or ""])
        decoder = IncrementalDecoder(self.tokenizer, params.stop)
        lm = self.model.language_model
        options = self._engine_options(params) | self._follow_up(keys)
        for event in stream(lm, prefix, prompt_ids, params, **options):
            delta = decoder.push(event.token_id)
            if delta:
                yield delta
        if tail := decoder.flush():
            yield tail

    # -- outputs -----------------------------------------------------------------------

    def stop_check(self, stops: Sequence[str]) -> StopCheck | None:
        """new token ids -> has one of ``stops`` appeared in their text? (None: no stops)"""
        return stop_check(self.tokenizer, stops)

    def _follow_up(self, image_keys: list[str] | None) -> dict[str, Any]:
        """Engine options that let one image's generation continue the last turn's cache."""
        if self.conversation is None or image_keys is None or len(image_keys) != 1:
            return {}
        return {"conversation": self.conversation, "image_key": image_keys[0]}

    def _engine_options(self, params: GenerationParams) -> dict[str, Any]:
        """The checkpoint's token ids, and a stop-string check when stop strings are set."""
        stop = self.stop_check(params.stop)
        stop_checker = None if stop is None else (lambda _row, new_ids: stop(new_ids))
        return {**self.defaults.engine_tokens(), "stop_checker": stop_checker}


def _as_list(images: Any) -> list[Any]:
    return list(images) if isinstance(images, list | tuple) else [images]


def _prompts_for(sources: list[Any], prompts: str | Sequence[str | None] | None) -> list[str]:
    if prompts is None or isinstance(prompts, str):
        return [prompts or ""] * len(sources)
    prompts = list(prompts)
    if len(prompts) != len(sources):
        raise InvalidRequest(f"got {len(sources)} images but {len(prompts)} prompts")
    return [p or "" for p in prompts]
