"""The generated scenes committed in ``examples/`` and their right captions."""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"


def example_captions() -> dict[str, str]:
    """File name -> the scene's one correct caption (from ``examples/captions.tsv``)."""
    lines = (EXAMPLES / "captions.tsv").read_text().splitlines()
    return dict(line.split("\t") for line in lines)
