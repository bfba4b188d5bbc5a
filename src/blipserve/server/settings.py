"""Server settings: one frozen object, from flags and ``BLIPSERVE_*`` environment variables.

A flag given on the command line wins over the environment, which wins over the default:
``--max-waiting 128`` or ``BLIPSERVE_MAX_WAITING=128``; ``--api-key`` or
``BLIPSERVE_API_KEY`` (prefer the environment: flags show up in ``ps``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from blipserve.flags import QUANTIZATIONS, add_model_flags

ENV_PREFIX = "BLIPSERVE_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True)
class ServerSettings:
    model: str = "demo"
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None  # "int8": int8 language-model weights
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None  # None: no auth (the default binds to loopback only)
    max_batch_rows: int = 32  # sequences decoded together
    max_waiting: int = 64  # queued requests (rows) before 429
    request_timeout: float = 90.0  # seconds, then 408 (Azure ML's sample deployment: 90 s)
    max_body_mb: float = 100.0  # then 413 (Azure ML's sample deployment: 100 MB)
    max_rows: int = 64  # images in one request
    prefix_cache_size: int = 256  # image prefixes kept (LRU)
    allow_private_urls: bool = False  # fetch from loopback / private / link-local addresses
    allowed_hosts: tuple[str, ...] = field(default=())  # hosts or CIDRs allowed although private
    no_ui: bool = False  # True: no web page at /ui/ (GET / then answers browsers as probes)
    root_path: str = ""  # path prefix a reverse proxy serves this under, e.g. "/blip2"
    log_level: str = "info"

    def __post_init__(self) -> None:
        lowest = {
            "port": 0,  # 0: any free port
            "max_batch_rows": 1,
            "max_waiting": 1,
            "max_rows": 1,
            "prefix_cache_size": 0,
        }
        for name, least in lowest.items():
            if getattr(self, name) < least:
                raise ValueError(
                    f"{_flag(name)} must be at least {least}, got {getattr(self, name)}"
                )
        if self.port > 65535:
            raise ValueError(f"--port must be at most 65535, got {self.port}")
        for name in ("request_timeout", "max_body_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.quantize not in (None, *QUANTIZATIONS):
            raise ValueError(
                f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}"
            )
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ValueError(
                f"--root-path must start with '/' and not end with one (e.g. /blip2), "
                f"got {self.root_path!r}"
            )
        if self.log_level not in LOG_LEVELS:
            raise ValueError(
                f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``blipserve serve`` flags, one per setting (defaults come from the environment)."""
    add_model_flags(
        parser,
        model_help="checkpoint: 'demo', a directory or a Hub id",
        quantize=True,
        with_defaults=False,
    )
    helps = {
        "api_key": "require 'Authorization: Bearer KEY' (or set BLIPSERVE_API_KEY)",
        "max_batch_rows": "sequences decoded together",
        "max_waiting": "queued requests before answering 429",
        "request_timeout": "seconds before answering 408",
        "max_body_mb": "request body limit in MB (413 above)",
        "max_rows": "images in one request",
        "prefix_cache_size": "image prefixes cached (same image bytes skip the encoder)",
        "allow_private_urls": "fetch image URLs on private, loopback and link-local addresses",
        "allowed_hosts": "comma-separated hosts or CIDRs to fetch from although private",
        "no_ui": "do not serve the web page (/ui/) to try the model in a browser",
        "root_path": "path prefix when served behind a reverse proxy that strips it (e.g. /blip2)",
    }
    for f in fields(ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("model", "device", "dtype", "quantize"):
            continue  # added above, as every command has them
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=helps.get(f.name))
        else:
            parser.add_argument(flag, default=None, help=helps.get(f.name))


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> ServerSettings:
    """Flags over ``BLIPSERVE_*`` variables over defaults; bad values raise ValueError."""
    values = {}
    for f in fields(ServerSettings):
        raw = getattr(args, f.name, None)
        if raw is None:
            raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is None:
            continue
        values[f.name] = _convert(f.name, f.type, raw)
    return ServerSettings(**values)


def _convert(name: str, kind: str, raw: object) -> object:
    if not isinstance(raw, str):
        return raw
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError:
        raise ValueError(
            f"{_flag(name)} / {ENV_PREFIX}{name.upper()}: {raw!r} is not a valid {kind}"
        ) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
