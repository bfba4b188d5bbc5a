"""The on-disk progress record that makes a batch run resumable and exactly-once.

    OUTPUT_DIR/
      predictions.csv | predictions.jsonl | predictions.parquet   (written last)
      errors.jsonl                                                 (azure-csv only)
      .blipserve/
        manifest.json          what the run computes: inputs, model, settings, chunking
        lock                   flock'd by the running driver: one run per output folder
        parts/000000-00000000.jsonl   one committed chunk: one JSON line per input row

A chunk's part is written to a temporary file, fsync'd, then renamed into place: the
rename is the commit. A part either exists whole or not at all, so a run killed at any
moment (SIGKILL included) loses at most the chunks in flight, and a rerun redoes exactly
those. The final outputs are merged from the parts in (file, row) order the same way
(temporary file + rename), so a kill during the merge leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipserve.batch.sources import ChunkRef
from blipserve.errors import BlipserveError
from blipserve.flags import generation_flag

STATE_DIR = ".blipserve"
MANIFEST_VERSION = 2  # 2: consecutive image files share chunks


class ResumeConflict(BlipserveError):
    """OUTPUT_DIR holds a run with other settings (or another run is using it)."""


@dataclass(frozen=True)
class Result:
    """One row's outcome; ``text`` is None exactly when ``error`` is set."""

    file: str
    row: int
    text: str | None
    error: str | None = None

    def to_json(self) -> str:
        record = {"file": self.file, "row": self.row, "text": self.text, "error": self.error}
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Result:
        d = json.loads(line)
        return cls(d["file"], d["row"], d["text"], d["error"])


class Progress:
    """The state folder of one output directory."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.state = self.output_dir / STATE_DIR
        self.parts = self.state / "parts"
        self.manifest_path = self.state / "manifest.json"

    # -- manifest ------------------------------------------------------------------------

    def start(self, manifest: dict[str, Any], *, restart: bool = False) -> None:
        """Create the state folder, or check that it belongs to this very run."""
        self.parts.mkdir(parents=True, exist_ok=True)
        record = json.loads(json.dumps({"version": MANIFEST_VERSION, **manifest}))
        self.remove_temporaries()
        if self.manifest_path.exists() and not restart:
            old = json.loads(self.manifest_path.read_text())
            if old != record:
                raise ResumeConflict(
                    f"{self.output_dir} holds a run with other settings ({_diff(old, record)}); "
                    "use the same command to resume it, another OUTPUT_DIR, or --restart "
                    "to discard its progress"
                )
            return
        self.clear()  # parts without a manifest (or --restart) belong to no known run
        atomic_write(self.manifest_path, json.dumps(record, indent=1, sort_keys=True) + "\n")

    def clear(self) -> None:
        self.manifest_path.unlink(missing_ok=True)  # first: parts without it are void
        for path in self.parts.iterdir():
            path.unlink()

    def remove_temporaries(self) -> None:
        """Leftovers of a killed run: temporary files that were never renamed."""
        for folder in (self.parts, self.state, self.output_dir):
            for path in folder.glob(".tmp-*"):
                path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock for one run; a second run on it is refused."""
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.state / "lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ResumeConflict(f"another batch run is writing to {self.output_dir}") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- parts ---------------------------------------------------------------------------

    def part_path(self, ref: ChunkRef) -> Path:
        return self.parts / f"{ref.name}.jsonl"

    def is_committed(self, ref: ChunkRef) -> bool:
        return self.part_path(ref).exists()

    def commit(self, ref: ChunkRef, results: list[Result]) -> None:
        """Write one chunk's results, all or nothing."""
        assert len(results) == ref.n_rows, (ref, len(results))
        atomic_write(self.part_path(ref), "".join(r.to_json() + "\n" for r in results))

    def read_part(self, ref: ChunkRef) -> Iterator[Result]:
        with open(self.part_path(ref), encoding="utf-8") as f:
            for line in f:
                yield Result.from_json(line)

    def count_errors(self, refs: list[ChunkRef]) -> int:
        """Failed rows in the committed parts among ``refs``."""
        committed = (ref for ref in refs if self.is_committed(ref))
        return sum(r.error is not None for ref in committed for r in self.read_part(ref))


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old file or the new one."""
    with atomic_file(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[Any]:
    """A temporary file next to ``path``, fsync'd and renamed onto it on success."""
    tmp = path.parent / f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies
    try:
        with open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Manifest entries set by one flag (``params`` entries: their generation flag).
MANIFEST_FLAGS = {
    "input": "INPUT",
    "model": "--model",
    "dtype": "--dtype",
    "quantize": "--quantize",
    "chunk_size": "--chunk-size",
    "limit": "--limit",
}


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two manifests, by the flag that sets it: ``--max-new-tokens
    was 20, now 30``."""
    changes = []
    for key in sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)):
        before, after = old.get(key), new.get(key)
        if key == "params":
            names = sorted(n for n in {**before, **after} if before.get(n) != after.get(n))
            changes += [_change(generation_flag(n), before.get(n), after.get(n)) for n in names]
        elif key == "inputs":
            changes.append(_inputs_change(before or [], after or []))
        elif key == "exif_transpose":
            changes.append("--no-exif " + ("is given now" if before else "was given before"))
        elif key == "quantize":  # absent: none
            changes.append(_change("--quantize", before or "none", after or "none"))
        elif key == "rows":
            changes.append(f"the inputs had {before} rows, now {after}")
        elif key == "version":
            changes.append(f"its progress record is version {before}, this blipserve's {after}")
        else:
            changes.append(_change(MANIFEST_FLAGS.get(key, key), before, after))
    return "; ".join(changes) or "differs"


def _change(flag: str, before: Any, after: Any) -> str:
    return f"{flag} was {json.dumps(before)}, now {json.dumps(after)}"


def _inputs_change(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """Which input files are new, gone or changed (size or modification time)."""
    old = {f["name"]: f for f in before}
    new = {f["name"]: f for f in after}
    changed = [f"{n} (new)" for n in new if n not in old]
    changed += [f"{n} (gone)" for n in old if n not in new]
    changed += [f"{n} (modified)" for n in new if n in old and new[n] != old[n]]
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"input files changed: {shown}"
