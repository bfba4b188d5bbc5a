"""The BLIP-2 tokenizers: GPT-2 byte-level BPE (OPT) and Unigram (Flan-T5), run by ``tokenizers``.

It reproduces what transformers 5.x builds for a BLIP-2 OPT checkpoint (``GPT2Tokenizer``,
used through ``Blip2Processor``), so the model sees exactly the reference token ids:

- **Pipeline.** No normaliser; ``ByteLevel`` pre-tokenizer (``add_prefix_space`` from
  ``tokenizer_config.json``, false for OPT); BPE rebuilt from the vocabulary and merges;
  ``ByteLevel`` decoder. A ``tokenizer.json`` contributes its vocabulary, merges, added
  tokens and post-processor; its pre-tokenizer and decoder are replaced, as transformers does.
- **BOS.** From ``vocab.json`` + ``merges.txt``, ``add_bos_token`` (true for OPT) puts
  ``</s>`` (id 2) before every text and nothing after it. From a ``tokenizer.json``,
  transformers ignores ``add_bos_token`` and keeps the file's post-processor; so do we.
- **Added tokens** (``</s>``, ``<pad>``, ``<image>``) are cut out of the text before BPE,
  wherever they appear: ``"x <image>"`` is ``x``, ``Ġ``, ``<image>``. ``<s>`` and ``<unk>``
  are vocabulary entries but not added tokens in OPT, so ``"<s>"`` in text is plain text.
- **``<image>``** is always special (skipped when decoding), because ``Blip2Processor``
  re-adds it as special even where ``added_tokens.json`` alone would make it ordinary.
- **Decoding** skips special added tokens, drops ids beyond the vocabulary, and applies no
  ``clean_up_tokenization_spaces`` (transformers 5 ignores it for BPE); BLIP-2 then strips
  the text, so :meth:`Tokenizer.decode` does too.

The tokenizer's ``eos_token_id`` is ``</s>``; the BLIP-2 OPT model stops at ``"\\n"``
(id 50118) instead, which comes from the generation config, not from here.

**Flan-T5** checkpoints ship a SentencePiece-Unigram ``tokenizer.json``. transformers 5.x
(``T5Tokenizer``) keeps only its pieces and scores and the ``Precompiled`` normalizer's
character map, and builds the rest itself; so do we (:func:`_t5_unigram`): ``WhitespaceSplit``
then ``Metaspace`` (``▁``, prepended always), the ``Metaspace`` decoder, ``<unk>`` at id 2,
no BOS and ``</s>`` after every text (``"a photo of"`` -> ``▁a ▁photo ▁of </s>``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

from blipserve.errors import CheckpointError, InvalidRequest

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
ADDED_TOKENS_JSON = "added_tokens.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

IMAGE_TOKEN = "<image>"
# Named special tokens, in the order transformers lists them in ``all_special_ids``.
SPECIAL_ROLES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class Tokenizer:
    """Text <-> token ids for BLIP-2 OPT and Flan-T5 checkpoints; see the module docstring."""

    def __init__(
        self, backend: RustTokenizer, special_tokens: dict[str, str], image_token: str | None
    ) -> None:
        self._backend = backend
        self._special_tokens = special_tokens  # role -> content, e.g. "bos_token" -> "</s>"
        self._image_token = image_token

    # -- loading and saving ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` if present, else ``vocab.json`` + ``merges.txt``.

        ``tokenizer_config.json`` is required; ``special_tokens_map.json`` and
        ``added_tokens.json`` are read when the config has no ``added_tokens_decoder``
        (checkpoints saved before transformers 4.34).
        """
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG
        has_json = (directory / TOKENIZER_JSON).is_file()
        has_slow = (directory / VOCAB_JSON).is_file() and (directory / MERGES_TXT).is_file()
        if not config_path.is_file() or not (has_json or has_slow):
            raise CheckpointError(
                f"no tokenizer in {directory}: expected {TOKENIZER_CONFIG} plus either "
                f"{TOKENIZER_JSON} or {VOCAB_JSON} and {MERGES_TXT}"
            )
        config = _read_json(config_path)
        if has_json and _model_type(directory / TOKENIZER_JSON) == "Unigram":
            return cls._from_t5_files(directory, config)
        if has_json:
            source = _read_tokenizer_json(directory / TOKENIZER_JSON)
        else:
            source = _read_vocab_and_merges(directory)
        special = _named_special_tokens(config, directory)
        added = _declared_added_tokens(config, directory, source["added_tokens"], special)

        roles = {role: token.content for role, token in special.items()}

        backend = _byte_level_bpe(source["vocab"], source["merges"], config)
        _add_tokens(backend, added, special, directory)
        # transformers keeps a tokenizer.json's post-processor and ignores add_bos_token then
        post = source["post_processor"] if has_json else _bos_eos_template(config, roles, backend)
        backend.post_processor = post
        image_token = _mark_image_token(backend, config)
        return cls(backend, roles, image_token)

    @classmethod
    def _from_t5_files(cls, directory: Path, config: dict[str, Any]) -> Tokenizer:
        """A Flan-T5 tokenizer, built as transformers' ``T5Tokenizer`` builds it."""
        path = directory / TOKENIZER_JSON
        data = _read_json(path)
        special = _named_special_tokens(config, directory)
        added = _declared_added_tokens(config, directory, [], special)
        backend = _t5_unigram(data, path)
        _add_tokens(backend, added, special, directory)
        roles = {role: token.content for role, token in special.items()}
        eos = roles.get("eos_token", "</s>")
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}",
            pair=f"$A {eos} $B {eos}",
            special_tokens=[(eos, backend.token_to_id(eos))],
        )
        return cls(backend, roles, _mark_image_token(backend, config))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json``, loadable by
        :meth:`from_pretrained` and by transformers' ``AutoTokenizer``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / TOKENIZER_JSON))
        added = {
            str(index): token.__getstate__()
            for index, token in sorted(self._backend.get_added_tokens_decoder().items())
        }
        config: dict[str, Any] = {
            **self._special_tokens,
            **self._class_config(),
            "added_tokens_decoder": added,
            "clean_up_tokenization_spaces": False,
        }
        _write_json(directory / TOKENIZER_CONFIG, dict(sorted(config.items())))

    def _class_config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` entries of transformers' class for this tokenizer:
        ``T5Tokenizer`` (its sentinels, if any, are among the added tokens) or ``GPT2Tokenizer``."""
        if isinstance(self._backend.model, models.Unigram):
            return {"tokenizer_class": "T5Tokenizer", "extra_ids": 0}
        return {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": self._backend.pre_tokenizer.add_prefix_space,
            "errors": "replace",
        }

    # -- ids ------------------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int | None:
        return self._role_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's eos (``</s>``), not the model's stop token ``"\\n"``."""
        return self._role_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._role_id("pad_token")

    @property
    def backend(self) -> RustTokenizer:
        """The ``tokenizers`` tokenizer underneath (e.g. for the Q-Former's stage-1 text)."""
        return self._backend

    @property
    def image_token_id(self) -> int | None:
        if self._image_token is None:
            return None
        return self._backend.token_to_id(self._image_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens (``<image>``) included; transformers' ``len(tokenizer)``."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens, each once, in transformers' order."""
        ids = (self._backend.token_to_id(token) for token in self._special_tokens.values())
        return list(dict.fromkeys(i for i in ids if i is not None))

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry or added token (``"<image>"``), or None."""
        return self._backend.token_to_id(token)

    def _role_id(self, role: str) -> int | None:
        token = self._special_tokens.get(role)
        return None if token is None else self._backend.token_to_id(token)

    # -- text <-> ids ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, BOS first: ``tokenizer(text).input_ids`` in transformers."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequest(f"prompt {i} must be a string, got {type(text).__name__}")
        return [encoding.ids for encoding in self._backend.encode_batch(texts)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``, stripped, as BLIP-2 decodes:
        ``batch_decode(ids, skip_special_tokens=True)[0].strip()``."""
        return self._backend.decode(_id_list(ids), skip_special_tokens=skip_special_tokens).strip()

    def decode_batch(
        self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True
    ) -> list[str]:
        sequences = [_id_list(ids) for ids in batch]
        texts = self._backend.decode_batch(sequences, skip_special_tokens=skip_special_tokens)
        return [text.strip() for text in texts]


# -- reading checkpoint files ---------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read tokenizer file {path}: {err}") from err


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_tokenizer_json(path: Path) -> dict[str, Any]:
    """Vocabulary, merges, added tokens and post-processor of a ``tokenizer.json``."""
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise CheckpointError(f"{path} does not hold a BPE tokenizer model")
    # Parse the post-processor alone: the same file with the vocabulary emptied.
    shell = {**data, "model": {**model, "vocab": {}, "merges": []}, "added_tokens": []}
    try:
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        added = [(entry["id"], _added_token(entry)) for entry in data.get("added_tokens", [])]
        post = RustTokenizer.from_str(json.dumps(shell)).post_processor
    except Exception as err:  # malformed entries; the Rust parser raises a bare Exception
        raise CheckpointError(f"cannot parse {path}: {err}") from err
    return {"vocab": vocab, "merges": merges, "added_tokens": added, "post_processor": post}


def _model_type(path: Path) -> str | None:
    """The ``model.type`` of a ``tokenizer.json`` ("BPE", "Unigram", ...)."""
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    return model.get("type") if isinstance(model, dict) else None


def _read_vocab_and_merges(directory: Path) -> dict[str, Any]:
    vocab_path, merges_path = directory / VOCAB_JSON, directory / MERGES_TXT
    try:
        vocab, merges = models.BPE.read_file(str(vocab_path), str(merges_path))
    except Exception as err:  # the Rust reader raises a bare Exception
        raise CheckpointError(f"cannot read {vocab_path} and {merges_path}: {err}") from err
    return {"vocab": vocab, "merges": merges, "added_tokens": []}


def _added_token(entry: str | dict[str, Any], *, special: bool | None = None) -> AddedToken:
    """An ``AddedToken`` from a config entry: a plain string or a dict of flags."""
    if isinstance(entry, str):
        return AddedToken(entry, special=bool(special))
    flags = {key: entry[key] for key in _TOKEN_FLAGS if key in entry}
    if special is not None:
        flags["special"] = special
    return AddedToken(entry["content"], **flags)


def _content(entry: str | dict[str, Any]) -> str:
    return entry if isinstance(entry, str) else entry["content"]


def _named_special_tokens(config: dict[str, Any], directory: Path) -> dict[str, AddedToken]:
    """Role -> token for bos/eos/unk/... and model-specific ``*_token`` entries (``image_token``).

    With an ``added_tokens_decoder`` in the config, a role naming one of its tokens takes
    that token's flags; legacy checkpoints take them from ``special_tokens_map.json``.
    """
    values = {role: config[role] for role in SPECIAL_ROLES if config.get(role) is not None}
    values |= {
        key: value
        for key, value in config.items()
        if key.endswith("_token") and key not in SPECIAL_ROLES and isinstance(value, str)
    }
    declared = {_content(e): e for e in config.get("added_tokens_decoder", {}).values()}
    legacy_map = directory / SPECIAL_TOKENS_MAP
    if "added_tokens_decoder" not in config and legacy_map.is_file():
        values |= {k: v for k, v in _read_json(legacy_map).items() if k in SPECIAL_ROLES and v}
    return {
        role: _added_token(declared.get(_content(value), value), special=True)
        for role, value in values.items()
    }


def _declared_added_tokens(
    config: dict[str, Any],
    directory: Path,
    from_tokenizer_json: list[tuple[int, AddedToken]],
    special: dict[str, AddedToken],
) -> dict[int, AddedToken]:
    """Index -> added token: the config's, or else ``added_tokens.json`` + ``tokenizer.json``'s."""
    if "added_tokens_decoder" in config:
        return {int(i): _added_token(e) for i, e in config["added_tokens_decoder"].items()}
    added: dict[int, AddedToken] = {}
    legacy_file = directory / ADDED_TOKENS_JSON
    if legacy_file.is_file():
        named = {token.content for token in special.values()}
        for content, index in _read_json(legacy_file).items():
            is_special = content in named
            added[int(index)] = AddedToken(content, normalized=not is_special, special=is_special)
    added.update(from_tokenizer_json)
    return added


# -- building the backend -------------------------------------------------------------------


def _byte_level_bpe(vocab: dict[str, int], merges: list, config: dict[str, Any]) -> RustTokenizer:
    """GPT-2's pipeline: byte-level pre-tokenizer and decoder around a plain BPE model."""
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    except Exception as err:  # the Rust constructor raises a bare Exception
        raise CheckpointError(f"inconsistent tokenizer vocabulary and merges: {err}") from err
    backend = RustTokenizer(bpe)
    prefix = bool(config.get("add_prefix_space", False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    backend.decoder = decoders.ByteLevel()
    return backend


def _t5_unigram(data: dict[str, Any], path: Path) -> RustTokenizer:
    """T5's pipeline around the Unigram pieces of a ``tokenizer.json`` (see the module doc)."""
    try:
        pieces = [(piece, float(score)) for piece, score in data["model"]["vocab"]]
        backend = RustTokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    except Exception as err:  # malformed entries; the Rust constructor raises a bare Exception
        raise CheckpointError(f"cannot parse the Unigram tokenizer in {path}: {err}") from err
    charsmap = _precompiled_charsmap(data.get("normalizer"))
    if charsmap is not None:
        backend.normalizer = normalizers.Precompiled(charsmap)
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    return backend


def _precompiled_charsmap(normalizer: dict[str, Any] | None) -> bytes | None:
    """The SentencePiece character map of a ``Precompiled`` normalizer (alone or in a
    ``Sequence``), decoded from base64; None without one."""
    if not normalizer:
        return None
    parts = (
        normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    )
    for part in parts:
        if part.get("type") == "Precompiled" and "precompiled_charsmap" in part:
            return base64.b64decode(part["precompiled_charsmap"])
    return None


def _add_tokens(
    backend: RustTokenizer,
    added: dict[int, AddedToken],
    special: dict[str, AddedToken],
    directory: Path,
) -> None:
    """Add the declared tokens in index order, then (re-)add the named ones as special.

    Each declared token must land on its declared id; otherwise the files do not match.
    """
    for index, token in sorted(added.items()):
        backend.add_tokens([token])
        if backend.token_to_id(token.content) != index:
            raise CheckpointError(
                f"tokenizer in {directory}: added token {token.content!r} is declared with id "
                f"{index} but the vocabulary gives it {backend.token_to_id(token.content)}"
            )
    backend.add_special_tokens(list({token.content: token for token in special.values()}.values()))


def _bos_eos_template(
    config: dict[str, Any], roles: dict[str, str], backend: RustTokenizer
) -> processors.TemplateProcessing:
    """``add_bos_token`` / ``add_eos_token`` as transformers' template: ``</s> $A`` for OPT."""
    bos, eos = roles.get("bos_token"), roles.get("eos_token")
    add_bos = bool(config.get("add_bos_token")) and bos is not None
    add_eos = bool(config.get("add_eos_token")) and eos is not None
    head = f"{bos}:0 " if add_bos else ""
    tail = f" {eos}:0" if add_eos else ""
    single = f"{head}$A:0{tail}"
    pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    used = [token for token, on in ((bos, add_bos), (eos, add_eos)) if on]
    special = [(token, backend.token_to_id(token)) for token in dict.fromkeys(used)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _mark_image_token(backend: RustTokenizer, config: dict[str, Any]) -> str | None:
    """Make ``<image>`` special, as ``Blip2Processor`` does; None if the vocabulary lacks it."""
    content = config.get("image_token") or IMAGE_TOKEN
    if backend.token_to_id(content) is None:
        return None
    backend.add_special_tokens([AddedToken(content, normalized=False, special=True)])
    return content


def _id_list(ids: Iterable[int]) -> list[int]:
    """Plain ints from a list, a NumPy array or a 1-D tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]
