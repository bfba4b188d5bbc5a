"""What a user names -> what loading needs: a checkpoint directory, a torch device and dtype.

Inference (:func:`blipserve.load`, :func:`blipserve.load_matcher`) and training take all
three from here. A model name is resolved in this order:

1. ``demo``: the small model bundled inside the package (MODEL_CARD.md, docs/demo-model.md);
   for matching (:func:`resolve_matcher_checkpoint`), the bundled demo matcher;
2. an existing local path: a directory in the Hugging Face layout (``config.json`` and
   weights);
3. a Hugging Face Hub id (``Salesforce/blip2-opt-2.7b``): the local Hub cache first, then a
   download through ``huggingface_hub``. Only safetensors are fetched when the repository
   has them (the Salesforce repos also carry fp32 ``.bin`` copies: 15 GB we do not need).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from blipserve.errors import InvalidRequest, ModelNotFound

DEMO_NAME = "demo"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_FILES = ["*.json", "*.txt"]  # config, tokenizer, preprocessor, generation config
WEIGHT_PATTERNS = (["*.safetensors"], ["*.bin"])  # preferred first
# torch's own checks (private, so each is looked up), and the /proc/cpuinfo flags they read.
CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(name: str) -> Path:
    """Return the directory holding checkpoint ``name``; raise :class:`ModelNotFound` if none."""
    if name == DEMO_NAME:
        return demo_checkpoint()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"{path} is not a BLIP-2 checkpoint directory: it has no config.json"
            )
        return path
    if HUB_ID.match(name):
        return download_from_hub(name)
    raise ModelNotFound(
        f"model {name!r} is neither 'demo', an existing directory, nor a Hub id like "
        "'Salesforce/blip2-opt-2.7b'"
    )


def demo_checkpoint() -> Path:
    return _bundled(
        "demo_model",
        "the bundled demo model",
        "`python -m blipserve.train.demo`",
        "a checkpoint directory or a Hub id such as 'Salesforce/blip2-opt-2.7b'",
    )


def resolve_matcher_checkpoint(name: str) -> Path:
    """:func:`resolve_checkpoint` for image-text matching: ``demo`` is the bundled demo
    matcher (stage 1 on the demo model's image encoder, docs/demo-model.md)."""
    if name != DEMO_NAME:
        return resolve_checkpoint(name)
    return _bundled(
        "demo_matcher",
        "the bundled demo matcher",
        "`python scripts/build_demo_matcher.py`",
        "a matching checkpoint such as 'Salesforce/blip2-itm-vit-g'",
    )


def _bundled(folder: str, what: str, rebuild: str, instead: str) -> Path:
    """The checkpoint shipped in the package's ``folder``, or ModelNotFound saying how to
    get it back."""
    directory = Path(__file__).parent / folder
    if not (directory / "config.json").is_file():
        raise ModelNotFound(
            f"{what} is missing from this installation ({directory}); reinstall blipserve, "
            f"rebuild it with {rebuild}, or pass {instead} with --model"
        )
    return directory


def download_from_hub(repo_id: str) -> Path:
    """Cached snapshot of ``repo_id``, downloading what is missing when online."""
    from huggingface_hub import snapshot_download  # import on use: start-up stays light

    last_error: Exception | None = None
    for local_only in (True, False):
        for weights in WEIGHT_PATTERNS:
            try:
                path = Path(
                    snapshot_download(
                        repo_id, allow_patterns=CONFIG_FILES + weights, local_files_only=local_only
                    )
                )
            except Exception as exc:  # offline, not found, gated, network: all say the same
                last_error = exc
                continue
            if (path / "config.json").is_file() and any(path.glob(weights[0])):
                return path
    raise ModelNotFound(
        f"cannot get {repo_id!r}: it is not in the local Hugging Face cache and downloading it "
        f"failed ({type(last_error).__name__}: {_first_line(last_error)}). On a machine with "
        f"internet run `hf download {repo_id} --local-dir DIR` (or let blipserve download it "
        "there), copy DIR here and pass it as the model"
    )


def _first_line(exc: Exception | None) -> str:
    return str(exc).strip().splitlines()[0] if exc and str(exc).strip() else "no details"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None): the GPU when CUDA is available, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise InvalidRequest(f"device {device!r} is not a valid torch device") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest(f"device {device!r} was asked for, but CUDA is not available here")
    return resolved


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device, *, float16_ok: bool = True
) -> torch.dtype:
    """``auto``: the dtype the device multiplies fastest. On a GPU bfloat16 (float16 where
    it has none); on a CPU bfloat16 where the processor computes it natively
    (:func:`cpu_has_native_bf16`), else float32. Ask for float32 for exact parity with
    transformers' float32.

    ``float16_ok=False`` (T5: its activations overflow float16's range, known since T5's
    release): ``auto`` takes float32 where it would take float16, and float16 asked for by
    name is refused."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return torch.float16 if float16_ok else torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(dtype)
    if resolved is None:
        raise InvalidRequest(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} or 'auto'")
    if resolved == torch.float16 and not float16_ok:
        raise InvalidRequest(
            "float16 is refused for T5 (Flan-T5) language models: their activations overflow "
            "it (inf/NaN, empty or garbled text); use bfloat16 (the GPU default) or float32"
        )
    return resolved


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere
    torch emulates it, about 5x slower than float32 (measured on an AVX2 machine)."""
    probes = [getattr(torch.cpu, name, None) for name in CPU_BF16_PROBES]
    if all(probe is not None for probe in probes):
        return any(probe() for probe in probes)
    try:  # a torch without the probes: the kernel's view of the processor
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & CPU_BF16_FLAGS)
