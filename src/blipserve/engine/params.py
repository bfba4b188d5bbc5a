"""Generation options: what the caller may ask for, validated with clear errors.

Defaults are the BLIP-2 checkpoints' (greedy, 20 new tokens); a checkpoint's
``generation_config.json`` may override them (:meth:`GenerationParams.checkpoint_keys`).
Each field's ``help`` metadata is its one-line description: the command line's generation
flags are made from these fields (:mod:`blipserve.flags`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from blipserve.errors import InvalidRequest

EarlyStopping = bool | Literal["never"]  # the reference's three beam-search stopping modes

MAX_NEW_TOKENS = 1024
MAX_BEAMS = 16
MAX_RETURN_SEQUENCES = 16
MAX_STOP_STRINGS = 8
MAX_TEMPERATURE = 100.0
MIN_SAMPLING_TEMPERATURE = 1e-5  # vLLM's epsilon; near 0, scores / t overflows to NaN probs
MAX_REPETITION_PENALTY = 100.0
SAMPLING_KEYS = ("temperature", "top_p", "top_k")  # given without do_sample: sampling


def _help(text: str, flag: str | None = None) -> dict[str, str]:
    """Field metadata: a one-line description, and the command-line flag when it is not the
    field's own name."""
    return {"help": text} if flag is None else {"help": text, "flag": flag}


@dataclass(frozen=True)
class GenerationParams:
    """How to generate; defaults are the BLIP-2 checkpoints' (greedy, 20 new tokens).

    ``early_stopping`` is True, False or ``"never"`` (the reference's three beam modes).
    ``seed`` makes sampling repeatable; without it sampling uses torch's global RNG.
    ``stop`` strings are matched by the caller's ``stop_checker`` (it owns the tokenizer).
    """

    max_new_tokens: int = field(
        default=20,
        metadata=_help(
            "most tokens to generate (default: the model's generation_config.json, 40 for "
            "demo, 20 for the Salesforce checkpoints); fewer where the model's positions "
            "run out after the prompt (finish reason 'length')"
        ),
    )
    min_new_tokens: int = field(
        default=0, metadata=_help("fewest tokens before the end-of-text token is allowed")
    )
    num_beams: int = field(default=1, metadata=_help("beam search width (1 = greedy or sampling)"))
    length_penalty: float = field(
        default=1.0, metadata=_help("beam search: exponent on length when ranking finished beams")
    )
    early_stopping: EarlyStopping = field(
        default=False, metadata=_help("beam search: stop once enough beams end")
    )
    do_sample: bool = field(
        default=False,
        metadata=_help(
            "sample instead of greedy/beam search (--temperature, --top-k or --top-p alone "
            "also turn sampling on)",
            "sample",
        ),
    )
    temperature: float = field(
        default=1.0, metadata=_help("sampling temperature; 0 means greedy decoding")
    )
    top_k: int = field(default=50, metadata=_help("sampling: keep the k most likely tokens"))
    top_p: float = field(
        default=1.0,
        metadata=_help("sampling: keep the smallest set of tokens with this total probability"),
    )
    repetition_penalty: float = field(
        default=1.0, metadata=_help("penalise tokens already in the context (>1 discourages)")
    )
    num_return_sequences: int = field(
        default=1, metadata=_help("continuations per image (needs --sample or enough beams)")
    )
    seed: int | None = field(default=None, metadata=_help("random seed for sampling"))
    stop: tuple[str, ...] = field(default=(), metadata=_help("stop string (repeatable)"))

    @classmethod
    def checkpoint_keys(cls) -> tuple[str, ...]:
        """Fields a checkpoint's ``generation_config.json`` may set (not ``seed``/``stop``)."""
        return tuple(f.name for f in fields(cls) if f.name not in ("seed", "stop"))

    @classmethod
    def resolve(cls, defaults: Mapping[str, Any], options: Mapping[str, Any]) -> GenerationParams:
        """A caller's options over a checkpoint's defaults, with :func:`sampling_rule`
        applied to the caller's, validated: what the CLI, the Python API, the batch runner
        and the server all call."""
        params = cls.from_dict({**defaults, **sampling_rule(options)})
        params.validate()
        return params

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerationParams:
        """Build from user input; unknown keys are refused, ``None`` values mean "default".

        Call :meth:`validate` on the result before use.
        """
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise InvalidRequest(
                f"unknown generation parameter(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        values = {k: v for k, v in d.items() if v is not None}
        if isinstance(values.get("stop"), str):
            values["stop"] = (values["stop"],)
        elif isinstance(values.get("stop"), list | tuple):
            values["stop"] = tuple(values["stop"])
        for name in ("length_penalty", "temperature", "top_p", "repetition_penalty"):
            if _is_int(values.get(name)):
                values[name] = float(values[name])
        return cls(**values)

    def validate(self) -> None:
        """Raise :class:`InvalidRequest` naming the first out-of-range parameter."""
        _check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        _check_int("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)
        _check_int("num_beams", self.num_beams, 1, MAX_BEAMS)
        _check_float("length_penalty", self.length_penalty, -math.inf, math.inf)
        if self.early_stopping not in (True, False, "never") or _is_int(self.early_stopping):
            raise InvalidRequest(
                f"early_stopping must be true, false or 'never', got {self.early_stopping!r}"
            )
        if not isinstance(self.do_sample, bool):
            raise InvalidRequest(f"do_sample must be true or false, got {self.do_sample!r}")
        _check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        if self.do_sample and self.temperature < MIN_SAMPLING_TEMPERATURE:
            raise InvalidRequest(
                f"temperature must be >= {MIN_SAMPLING_TEMPERATURE:g} when do_sample is true "
                f"(got {self.temperature!r}; for greedy decoding set do_sample=false)"
            )
        _check_int("top_k", self.top_k, 0, 2**31 - 1)
        _check_float("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise InvalidRequest("top_p must be in (0, 1], got 0.0")
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY)
        if self.repetition_penalty == 0.0:
            raise InvalidRequest("repetition_penalty must be in (0, 100] (1.0 = off), got 0.0")
        _check_int("num_return_sequences", self.num_return_sequences, 1, MAX_RETURN_SEQUENCES)
        if self.do_sample and self.num_beams > 1:
            raise InvalidRequest(
                "sampling (do_sample, or a temperature, top_p or top_k, which turn it on) with "
                "num_beams > 1 is not supported; use num_beams=1 to sample, or drop the "
                "sampling options for beam search"
            )
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise InvalidRequest(
                f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                f"({self.num_beams}) without sampling; set do_sample=true or raise num_beams"
            )
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop must be a list of at most {MAX_STOP_STRINGS} strings")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty strings")


def sampling_rule(options: Mapping[str, Any]) -> dict[str, Any]:
    """The caller's options (``None`` values dropped) with the one sampling rule applied.

    ``temperature``, ``top_p`` or ``top_k`` given without ``do_sample`` turn sampling on
    (what a caller setting a temperature means, as with OpenAI); ``temperature`` 0 (below
    ``MIN_SAMPLING_TEMPERATURE``) means greedy; with ``do_sample`` false the others are
    refused rather than ignored (transformers ignores them with a warning).
    """
    options = {k: v for k, v in options.items() if v is not None}
    temperature = options.get("temperature")
    greedy = _is_number(temperature) and 0 <= temperature < MIN_SAMPLING_TEMPERATURE
    if greedy and not options.get("do_sample"):
        del options["temperature"]  # 0 = greedy (OpenAI's convention)
        options.setdefault("do_sample", False)
        return options
    given = [k for k in SAMPLING_KEYS if k in options]
    if "do_sample" not in options and given:
        options["do_sample"] = True
    elif options.get("do_sample") is False and given:
        raise InvalidRequest(
            f"do_sample is false, so {', '.join(given)} would be ignored; drop "
            f"{'it' if len(given) == 1 else 'them'} for greedy or beam search, or set "
            "do_sample=true"
        )
    return options


def _is_number(value: Any) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    if not _is_number(value) or not math.isfinite(value) or not low <= value <= high:
        span = "a finite number" if math.isinf(low) else f"a number in [{low}, {high}]"
        raise InvalidRequest(f"{name} must be {span}, got {value!r}")
