"""Azure ML's real-time endpoint contract: ``POST /score``.

    {"input_data": {"columns": ["image", "text"], "index": [0, 1],
                    "data": [["<base64 or URL>", "Question: what is it? Answer:"], ...]},
     "params": {"max_new_tokens": 30, "num_beams": 3}}
    -> [{"text": "..."}, {"text": "..."}]            (row order)

``params`` are honoured (the managed service ignores them). With
``num_return_sequences > 1`` each row also gets ``"texts"``: all its sequences.

This module owns the route and its request schema; the row schema (shared with MLflow's
``/invocations``) is in :mod:`blipserve.server.schemas`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from blipserve.server.deps import MODEL_ROUTE, Service, json_content
from blipserve.server.frames import rows_from_split
from blipserve.server.schemas import ScoreRow, to_row

router = APIRouter(tags=["Azure ML"], dependencies=MODEL_ROUTE)


class SplitFrame(BaseModel):
    columns: list[str] = Field(examples=[["image", "text"]])
    index: list[Any] | None = None
    data: list[list[Any]] = Field(examples=[[["<base64 image>", "Question: what is it? Answer:"]]])


class ScoreRequest(BaseModel):
    input_data: SplitFrame
    params: dict[str, Any] | None = None


@router.post(
    "/score",
    dependencies=[Depends(json_content)],
    response_model=list[ScoreRow],
    response_model_exclude_none=True,
    summary="Caption or answer, one row per image",
)
async def score(body: ScoreRequest, model: Service) -> list[dict]:
    params = model.params(body.params)
    rows = rows_from_split(body.input_data.columns, body.input_data.data)
    results = await model.generate(rows, params)
    return [to_row(generations) for generations in results]
