"""The errors blipserve raises for things a user can fix.

Everything a caller did wrong (a bad image, a bad parameter, a model that cannot be
found) raises a subclass of :class:`BlipserveError` whose message says what was wrong
and, where it helps, what to do. Our own invariants use ``assert``; HTTP status codes
are chosen only by the server.

    BlipserveError
    ├── InvalidImage        input is not a usable image (bad bytes, too big, fetch failed)
    ├── InvalidRequest      a parameter or prompt is malformed or out of range
    ├── ModelNotFound       a model name resolves to nothing loadable
    ├── UnsupportedModel    the checkpoint is a BLIP-2 variant we do not run (yet)
    └── CheckpointError     checkpoint files are incomplete or do not fit the config

One warning: :class:`HistoryTruncated`, when a chat history is longer than the model's
positions allow and its oldest turns are left out (``Pipeline.chat``).
"""

from __future__ import annotations


class BlipserveError(Exception):
    """Base class for errors caused by input, configuration or files, not by a bug."""


class InvalidImage(BlipserveError):
    """An input could not be turned into an image.

    ``row`` is the position of the offending input in a batch, when known; ``transient``
    says a retry may succeed (a network timeout, a reset, HTTP 5xx, 429 or 408).
    """

    def __init__(self, message: str, *, row: int | None = None, transient: bool = False) -> None:
        self.row = row
        self.reason = message
        self.transient = transient
        super().__init__(f"row {row}: {message}" if row is not None else message)


class InvalidRequest(BlipserveError):
    """A generation parameter, prompt or message list is malformed or out of range."""


class ModelNotFound(BlipserveError):
    """A model name is neither the bundled demo, a local checkpoint, nor a reachable Hub id."""


class UnsupportedModel(BlipserveError):
    """The checkpoint is valid but uses an architecture blipserve does not run yet."""


class CheckpointError(BlipserveError):
    """Checkpoint files are missing tensors, carry unexpected ones, or have wrong shapes."""


class HistoryTruncated(UserWarning):
    """A chat history did not fit the model's positions: its oldest turns were left out."""
