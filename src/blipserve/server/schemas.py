"""Response schemas shared by more than one router (a router's own stay in that router).

Azure ML's ``/score`` and MLflow's ``/invocations`` answer each row alike:
``{"text": ...}``, plus ``"texts"`` (all its sequences) when a row has several.
"""

from __future__ import annotations

from pydantic import BaseModel


class ScoreRow(BaseModel):
    text: str
    texts: list[str] | None = None


def to_row(generations: list) -> dict:
    """One row's generations -> ``{"text": first}``, with ``"texts"`` when there are more."""
    row = {"text": generations[0].text}
    if len(generations) > 1:
        row["texts"] = [g.text for g in generations]
    return row
