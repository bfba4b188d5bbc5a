"""A checkpoint's ``generation_config.json``: its token ids and generation defaults.

Read when a checkpoint loads (:meth:`CheckpointDefaults.read`), built from the dict a
trainer holds (:meth:`CheckpointDefaults.from_dict`) and written back beside the trained
weights (:meth:`CheckpointDefaults.to_dict`): one reader, one writer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blipserve.engine.params import GenerationParams
from blipserve.model.blip2 import Blip2Config

FILE_NAME = "generation_config.json"


@dataclass(frozen=True)
class CheckpointDefaults:
    """Token ids the checkpoint's ``generation_config.json`` / ``config.json`` fix, and the
    generation options it sets (``max_new_tokens``, ``num_beams``...)."""

    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    image_token_id: int | None
    params: dict[str, Any] = field(default_factory=dict)
    decoder_start_token_id: int | None = None  # encoder-decoder (T5) checkpoints only

    @classmethod
    def read(cls, directory: Path, config: Blip2Config) -> CheckpointDefaults:
        """From ``directory/generation_config.json`` (if any) over ``config``'s ids."""
        path = directory / FILE_NAME
        return cls.from_dict(json.loads(path.read_text()) if path.is_file() else {}, config)

    @classmethod
    def from_dict(cls, gen: Mapping[str, Any], config: Blip2Config) -> CheckpointDefaults:
        """From ``generation_config.json``'s content ``gen`` over ``config``'s ids."""
        eos = gen.get("eos_token_id", config.text.eos_token_id)
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        pad = gen.get("pad_token_id", config.text.pad_token_id)
        params = {k: gen[k] for k in GenerationParams.checkpoint_keys() if k in gen}
        start = None
        if config.is_encoder_decoder:
            start = gen.get("decoder_start_token_id", config.text.decoder_start_token_id)
        return cls(eos_ids, pad, config.image_token_index, params, start)

    def to_dict(self, bos_token_id: int | None) -> dict[str, Any]:
        """The ``generation_config.json`` content these defaults were read from."""
        eos = list(self.eos_token_ids)
        start = self.decoder_start_token_id
        return {
            "bos_token_id": bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": self.pad_token_id,
            **({} if start is None else {"decoder_start_token_id": start}),
            **self.params,
        }

    def engine_tokens(self) -> dict[str, Any]:
        """The token ids every engine call takes: ``eos_token_ids``, ``pad_token_id``,
        ``image_token_id`` (keyword arguments of :func:`blipserve.engine.generate.generate`
        and :class:`blipserve.engine.scheduler.Scheduler`)."""
        return {
            "eos_token_ids": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "image_token_id": self.image_token_id,
        }
