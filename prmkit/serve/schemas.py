"""Request bodies of `prmkit serve`: strict JSON, checked field by field, each problem one line naming the field.

The pydantic models document the endpoints in the OpenAPI schema (``/docs``); requests are read by the functions
here instead, so that every bad request gets one line (``items[2].steps[0]: empty step``) and the same checks as
`prmkit score` (:func:`prmkit.formats.step_problem`, :func:`prmkit.tokenization.text_problem`).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from prmkit.data.formats import step_problem
from prmkit.tokenization import text_problem


class RequestError(Exception):
    """A request the server refuses: an HTTP status and one line saying why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    """The body as JSON: strict (no NaN or Infinity), UTF-8, and not nested past Python's recursion limit."""
    if not body.strip():
        raise RequestError(400, "malformed JSON: the body is empty")
    try:
        return json.loads(body, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise RequestError(400, f"malformed JSON: the body is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None


def _kind(value: Any) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def need_object(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise RequestError(422, f"the body must be a JSON object, got {_kind(obj)}")
    return obj


def refuse_unknown(obj: dict, known: tuple[str, ...], where: str = "") -> None:
    extra = [k for k in obj if k not in known]
    if extra:
        raise RequestError(422, f"{where}{extra[0]}: unknown field; expected {', '.join(known)}")


def optional_text(obj: dict, key: str, where: str = "") -> str | None:
    return None if obj.get(key) is None and key not in obj else text_field(obj, key, where)


def text_field(obj: dict, key: str, where: str = "") -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise RequestError(422, f"{where}{key}: expected a string, got {_kind(value)}")
    problem = text_problem(value)
    if problem:
        raise RequestError(422, f"{where}{key}: {problem}")
    return value


def string_list(obj: dict, key: str, where: str = "") -> list[str]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise RequestError(422, f"{where}{key}: expected a list of strings, got {_kind(value)}")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise RequestError(422, f"{where}{key}[{i}]: expected a string, got {_kind(text)}")
        problem = text_problem(text)
        if problem:
            raise RequestError(422, f"{where}{key}[{i}]: {problem}")
    return value


def steps_field(obj: dict, key: str, where: str) -> list[str]:
    steps = string_list(obj, key, where)
    if not steps:
        raise RequestError(422, f"{where}{key}: empty: expected a non-empty list of strings")
    for i, step in enumerate(steps):
        problem = step_problem(step)
        if problem:
            raise RequestError(422, f"{where}{key}[{i}]: {problem}")
    return steps


# ---------------------------------------------------------------------------------------------------------------------
# The OpenAPI schema (documentation; see the module docstring)


class ScoreItem(BaseModel):
    prompt: str
    steps: list[str] = Field(min_length=1)


class ScoreRequest(BaseModel):
    """Either ``items``, or one ``prompt`` with a ``response`` the server cuts into steps."""

    items: list[ScoreItem] | None = None
    prompt: str | None = None
    response: str | None = None
    step_separator: str | None = Field(None, description="Where to cut the response; default: the server's.")


class ScoredItem(BaseModel):
    step_scores: list[float | None] = Field(description="p(step correct); null for a step cut by max_length")
    aggregates: dict[str, float | None] = Field(description="min, prod, last, mean of the scores read")
    first_error: int = Field(description="first step below score.threshold, or -1")
    truncated: bool
    reward: float = Field(description="serve.aggregate under serve.truncated")
    steps: list[str] | None = Field(None, description="the steps cut from a response")


class ScoreResponse(BaseModel):
    model: str
    items: list[ScoredItem]


class RewardRequest(BaseModel):
    """OpenRLHF's remote reward model request: each query is prompt + response."""

    query: list[str]
    prompts: list[str] | None = None
    labels: list[Any] | None = None


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    step_rewards: list[list[float | None]]
    extra_logs: dict[str, list[float]]


class PoolingRequest(BaseModel):
    """vLLM's /pooling request (completion or chat form) with ``task: token_classify``."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[dict[str, Any]] | None = None
    task: str | None = "token_classify"
    add_special_tokens: bool | None = None


class PoolingData(BaseModel):
    index: int
    object: str = "pooling"
    data: list[list[float]] = Field(description="per step tag: [p_wrong, p_correct]")


class PoolingResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: dict[str, int | None]


class ModelInfo(BaseModel):
    model: str
    kind: str
    step_separator: str
    tokenization: dict[str, Any]
    aggregate: str
    truncated: str
    prmkit_version: str


class ErrorBody(BaseModel):
    message: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself (nested models inlined: a ``#/$defs`` reference would
    point nowhere inside the OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}
