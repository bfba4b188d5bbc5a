"""Checkpoint files -> a loaded :class:`Blip2Model` (or :class:`Blip2Retrieval`), with
every tensor accounted for.

Our modules use the Hugging Face parameter names, so the mapping from checkpoint keys to
our keys is the identity except for the cases in :data:`SKIPPED` and the legacy
vision-attention biases. Loading:

1. build the model on the meta device (no allocation, no random init);
2. stream tensors file by file, converting each straight to its target dtype and device
   (float32 for the Q-Former and query tokens, the requested dtype for the rest);
3. check every key: consumed, or skipped with a stated reason; shapes must match;
4. ``load_state_dict(assign=True)`` and tie ``lm_head`` to the input embedding.

Any missing, unexpected or mis-shaped tensor raises :class:`CheckpointError` naming the
tensor and the file it came from.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from blipserve.errors import CheckpointError
from blipserve.model.blip2 import Blip2Config, Blip2Model, keeps_fp32
from blipserve.model.int8 import kernel_dtype, quantize_weight, replace_linears
from blipserve.model.retrieval import Blip2Retrieval, Blip2RetrievalConfig

# Checkpoint keys we read but a model may not use, each with the reason. Regexes over full
# keys; a key the model has is always used.
SKIPPED: dict[str, str] = {
    r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.": (
        "the Q-Former's text feed-forward; OPT checkpoints never feed text to the Q-Former"
    ),
    r"qformer\.embeddings\.": "the Q-Former's text embeddings, used only for image-text matching",
    r".*\.position_ids$": "a constant index buffer; positions are computed, not stored",
    r"language_model\.(encoder|decoder)\.embed_tokens\.weight$": (
        "a copy of T5's language_model.shared.weight, the one embedding table both stacks use"
    ),
    r"language_model\.decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.": (
        "T5's cross-attention has no position bias; some exports carry an unused table"
    ),
}
TIED_HEAD = "language_model.lm_head.weight"
COPY_THREADS = 8  # host-to-device copies in flight while loading onto an accelerator
QUANTIZATIONS = ("int8",)
LEGACY_BIAS = re.compile(r"(vision_model\.encoder\.layers\.\d+\.self_attn)\.(q_bias|v_bias)$")


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face checkpoint directory, in load order.

    Preference: sharded safetensors (index), ``model.safetensors``, sharded ``.bin`` (index),
    ``pytorch_model.bin``.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            missing = [name for name in shards if not (directory / name).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index_path} lists shards that are not in {directory}: {', '.join(missing)}"
                )
            return [directory / name for name in shards]
        single = directory / index_name.replace(".index.json", "")
        if single.is_file():
            return [single]
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors(.index.json) or "
        f"pytorch_model.bin(.index.json); found {present or 'nothing'}"
    )


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, read lazily where the format allows."""
    if path.suffix == ".safetensors":
        yield from read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(
                f"cannot read {path} as a weights-only torch file: {exc}"
            ) from exc
        yield from state.items()


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a safetensors file, each a view of the mapped file whose
    pages are handed back to the system once the caller has taken the next tensor.

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype,
    shape, byte offsets) and the raw data. safetensors' own reader keeps every page it
    touched in this process's memory until the file closes: a float32 checkpoint loaded as
    bfloat16 peaked at 20.7 GB for a 7.7 GB model. Releasing each tensor's pages after its
    conversion keeps the peak near the model's own size. A caller that keeps a tensor
    unconverted still reads correct data: released pages of this private, read-only
    mapping are read again from the file when touched.
    """
    with open(path, "rb") as file:
        try:
            (length,) = struct.unpack("<Q", file.read(8))
            size = os.fstat(file.fileno()).st_size
            if length > size - 8:
                raise ValueError(f"its header claims {length} bytes, more than the file has")
            header = json.loads(file.read(length))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not a safetensors file: {exc}") from exc
        # Tensors made from the mapping keep it alive; it is unmapped when the last goes.
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    header.pop("__metadata__", None)
    data_start = 8 + length
    for name in sorted(header):
        info = header[name]
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        begin, end = info.get("data_offsets", (0, -1))
        shape = info.get("shape", [])
        if dtype is None or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
        if data_start + end > size:
            raise CheckpointError(f"{path} ends inside tensor {name!r}: the file is cut")
        if begin == end:
            yield name, torch.empty(shape, dtype=dtype)
            continue
        data = torch.frombuffer(
            mapped, dtype=torch.uint8, count=end - begin, offset=data_start + begin
        )
        yield name, data.view(dtype).reshape(shape)
        _release(mapped, data_start + begin, data_start + end)


def _release(mapped: mmap.mmap, start: int, end: int) -> None:
    """Drop the whole pages of ``mapped[start:end]`` from this process's memory."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED, first, last - first)


def skip_reason(name: str) -> str | None:
    for pattern, reason in SKIPPED.items():
        if re.match(pattern, name):
            return reason
    return None


def load_model(
    directory: Path,
    config: Blip2Config | Blip2RetrievalConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
) -> Blip2Model | Blip2Retrieval:
    """Build the model ``config`` describes from ``directory``'s weight files: a
    :class:`Blip2Model` (captioning) or a :class:`Blip2Retrieval` (image-text matching).

    ``quantize="int8"``: the language model's linear layers (the output head included)
    hold int8 weights (:mod:`blipserve.model.int8`), each quantized as it is read.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = Blip2Model(config) if isinstance(config, Blip2Config) else Blip2Retrieval(config)
    tie_head = isinstance(config, Blip2Config) and config.tie_word_embeddings
    # The reference ties OPT's head whatever the file holds; a T5 head the file holds is its
    # own (transformers 5 writes tie_word_embeddings true for untied Flan-T5 heads too).
    head_from_file = isinstance(config, Blip2Config) and config.is_encoder_decoder
    int8_weights = set()
    if quantize is not None:
        if quantize not in QUANTIZATIONS or not isinstance(model, Blip2Model):
            raise CheckpointError(
                f"quantize={quantize!r}: blipserve quantizes the language model of captioning "
                f"checkpoints, as one of {', '.join(QUANTIZATIONS)}"
            )
        compute = kernel_dtype(device, dtype)
        swapped = replace_linears(model.language_model, compute)
        int8_weights = {f"language_model.{name}.weight" for name in swapped}
    expected = model.state_dict()  # meta tensors: names and shapes

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """One checkpoint tensor -> the state-dict entries it becomes on ``device``."""
        if name in int8_weights:
            q, scales = quantize_weight(tensor.to(device))
            scales_name = name.removesuffix("weight") + "scales"
            return {name: q, scales_name: scales.to(expected[scales_name].dtype)}
        return {name: to_target(tensor, device, torch.float32 if keeps_fp32(name) else dtype)}

    tensors = checked_tensors(directory, expected, tie_head=tie_head and not head_from_file)
    loaded: dict[str, torch.Tensor] = {}
    if device.type == "cpu":  # torch already spreads each dtype conversion over the cores
        for name, tensor in tensors:
            loaded.update(convert(name, tensor))
    else:  # copies release the GIL: keep several host-to-device copies in flight
        with ThreadPoolExecutor(COPY_THREADS) as copier:
            futures = [copier.submit(convert, name, tensor) for name, tensor in tensors]
            for future in futures:
                loaded.update(future.result())

    head_is_int8 = TIED_HEAD in int8_weights
    tie_head = tie_head and TIED_HEAD not in loaded
    embedding = (
        "language_model." + type(model.language_model).input_embedding_key if tie_head else ""
    )
    if embedding in loaded:
        if head_is_int8:  # its own int8 copy; the embedding lookup keeps the full precision
            loaded.update(convert(TIED_HEAD, loaded[embedding]))
        else:
            loaded[TIED_HEAD] = loaded[embedding]
    missing = [name for name in expected if name not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(f"{directory} is missing {len(missing)} tensors: {shown}")

    model.load_state_dict(loaded, strict=True, assign=True)
    if tie_head and not head_is_int8:
        model.tie_weights()  # type: ignore[operator]
    return model.eval()


def checked_tensors(
    directory: Path, expected: dict[str, torch.Tensor], *, tie_head: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every checkpoint tensor we use, under our name, shape-checked; skipped ones with a
    reason in :data:`SKIPPED`; anything unknown is an error naming the tensor and file."""
    legacy_biases: dict[str, dict[str, torch.Tensor]] = {}
    source: dict[str, Path] = {}
    for path in checkpoint_files(directory):
        for name, tensor in iter_tensors(path):
            if (name not in expected and skip_reason(name)) or (name == TIED_HEAD and tie_head):
                continue
            if legacy := LEGACY_BIAS.match(name):
                legacy_biases.setdefault(legacy.group(1), {})[legacy.group(2)] = tensor
                source[legacy.group(1)] = path
                continue
            if name not in expected:
                raise CheckpointError(
                    f"unexpected tensor {name!r} in {path}: it does not belong to the BLIP-2 "
                    "model this config.json describes"
                )
            _check_shape(name, tensor, expected[name], path)
            yield name, tensor

    for prefix, parts in legacy_biases.items():
        if set(parts) != {"q_bias", "v_bias"}:
            raise CheckpointError(f"{source[prefix]} has only {sorted(parts)} for {prefix}")
        q, v = parts["q_bias"], parts["v_bias"]
        name = f"{prefix}.qkv.bias"
        bias = torch.cat([q, torch.zeros_like(q), v])  # k has no learned bias
        _check_shape(name, bias, expected[name], source[prefix])
        yield name, bias


def to_target(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Move at the file's width, then convert where the tensor lands (fast on a GPU).
    Always a copy: the model never holds a view of the file (which may be rewritten)."""
    converted = tensor.to(device).to(dtype)
    return converted.clone() if converted.data_ptr() == tensor.data_ptr() else converted


def _check_shape(name: str, tensor: torch.Tensor, want: torch.Tensor, path: Path) -> None:
    if tuple(tensor.shape) != tuple(want.shape):
        raise CheckpointError(
            f"tensor {name!r} in {path} has shape {tuple(tensor.shape)}, but config.json "
            f"implies {tuple(want.shape)}"
        )
