"""MLflow's scoring-server contract: ``POST /invocations`` (``/ping``, ``/health`` and
``/version`` live in :mod:`blipserve.server.app`).

JSON with exactly one of ``dataframe_split``, ``dataframe_records``, ``instances`` or
``inputs`` (plus optional ``params``), or a ``text/csv`` body with an ``image`` column:

    {"dataframe_records": [{"image": "<base64>", "text": "a photo of"}]}
    -> {"predictions": [{"text": "..."}]}

This module owns the route, its body parsing and the ``Predictions`` envelope; each
prediction is a :class:`~blipserve.server.schemas.ScoreRow`, as Azure ML's ``/score`` rows.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from blipserve.errors import InvalidRequest
from blipserve.server.deps import MODEL_ROUTE, Service
from blipserve.server.errors import invalid_json
from blipserve.server.frames import (
    rows_from_columns,
    rows_from_csv,
    rows_from_records,
    rows_from_split,
)
from blipserve.server.schemas import ScoreRow, to_row
from blipserve.server.service import Row

router = APIRouter(tags=["MLflow"], dependencies=MODEL_ROUTE)
FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")


class Predictions(BaseModel):
    predictions: list[ScoreRow]


@router.post(
    "/invocations",
    response_model=Predictions,
    response_model_exclude_none=True,
    summary="MLflow scoring: JSON (one of dataframe_split, dataframe_records, instances, "
    "inputs) or text/csv",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        }
    },
)
async def invocations(request: Request, model: Service) -> dict:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    if kind == "text/csv":
        rows, params = rows_from_csv(_text(raw)), None
    elif kind == "application/json" or kind.endswith("+json"):
        rows, params = _from_json(raw)
    else:
        raise HTTPException(
            415, f"Content-Type must be application/json or text/csv, got {kind or 'nothing'!r}"
        )
    results = await model.generate(rows, model.params(params))
    return {"predictions": [to_row(generations) for generations in results]}


def _from_json(raw: bytes) -> tuple[list[Row], dict[str, Any] | None]:
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InvalidRequest(invalid_json(err)) from None
    except ValueError as err:  # not UTF-8 (UnicodeDecodeError)
        raise InvalidRequest(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"the body must be a JSON object with one of {', '.join(FORMATS)}")
    given = [key for key in FORMATS if key in body]
    unknown = sorted(set(body) - set(FORMATS) - {"params"})
    if len(given) != 1 or unknown:
        raise InvalidRequest(
            f"the body must hold exactly one of {', '.join(FORMATS)} (and optionally params); "
            f"got {sorted(body)}"
        )
    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest("params must be an object of generation options")
    key, value = given[0], body[given[0]]
    if key == "dataframe_split":
        if not isinstance(value, dict) or "columns" not in value or "data" not in value:
            raise InvalidRequest("dataframe_split needs 'columns' and 'data'")
        if not isinstance(value["columns"], list) or not isinstance(value["data"], list):
            raise InvalidRequest("dataframe_split 'columns' and 'data' must be lists")
        return rows_from_split(value["columns"], value["data"]), params
    if key == "inputs" and isinstance(value, dict):
        return rows_from_columns(value), params
    if not isinstance(value, list):
        raise InvalidRequest(f"{key} must be a list of rows")
    return rows_from_records(value), params


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidRequest("the CSV body is not UTF-8 text") from None
