"""The routes answered on the lean ASGI path: one table that the path matches requests against
and that the OpenAPI document is built from, so neither can have a route the other lacks.

Two protocols are served there: inferd's own prediction routes (``protocol="inferd"``) and the
Open Inference Protocol's ``infer`` (``protocol="v2"``: JSON or binary tensors, and errors in
that protocol's ``{"error": "<message>"}`` shape).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from inferd.http.schemas import (
    ModelPredictRequest,
    ModelPredictResponse,
    PredictRequest,
    PredictResponse,
    V2InferRequest,
    V2InferResponse,
)

__all__ = ["LEAN_ROUTES", "V2_TAG", "LeanRoute", "match_lean"]

V2_TAG = "open inference protocol (v2)"

_PARAM = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True, slots=True)
class LeanRoute:
    """One route of the lean path, with what its documentation says."""

    method: str
    path: str
    """The template, as OpenAPI writes it: ``/v1/models/{name}/predict``."""
    summary: str
    tags: tuple[str, ...]
    request: type[BaseModel]
    response: type[BaseModel]
    params: dict[str, type] = field(default_factory=dict)
    """Path parameters and their types (``int`` ones must be decimal digits)."""
    protocol: Literal["inferd", "v2"] = "inferd"
    """Whose request and error bodies the route speaks."""
    _parts: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_parts", tuple(_PARAM.split(self.path)))

    def match(self, path: str) -> dict[str, Any] | None:
        """The path parameters if ``path`` is this route's, else None."""
        parts = self._parts
        if len(parts) == 1:
            return {} if path == parts[0] else None
        head, tail = parts[0], parts[-1]
        if not (path.startswith(head) and path.endswith(tail)) or len(path) <= len(head) + len(
            tail
        ):
            return None
        rest = path[len(head) : len(path) - len(tail)]
        values: dict[str, Any] = {}
        for i in range(1, len(parts) - 1, 2):
            name, literal = parts[i], parts[i + 1] if i + 2 < len(parts) else ""
            if literal:
                value, found, rest = rest.partition(literal)
                if not found:
                    return None
            else:
                value, rest = rest, ""
            if not value or "/" in value:
                return None
            if self.params.get(name) is int:
                if not (value.isascii() and value.isdigit()):
                    return None
                values[name] = int(value)
            else:
                values[name] = value
        return values


LEAN_ROUTES: tuple[LeanRoute, ...] = (
    LeanRoute(
        "POST",
        "/predict",
        "Predict with the default model",
        ("predict",),
        PredictRequest,
        PredictResponse,
    ),
    LeanRoute(
        "POST",
        "/v1/models/{name}/predict",
        "Predict with a named model; one row or a batch of rows",
        ("predict",),
        ModelPredictRequest,
        ModelPredictResponse,
        {"name": str},
    ),
    LeanRoute(
        "POST",
        "/v1/models/{name}/versions/{version}/predict",
        "Predict with one version of a model; one row or a batch of rows",
        ("predict",),
        ModelPredictRequest,
        ModelPredictResponse,
        {"name": str, "version": int},
    ),
    LeanRoute(
        "POST",
        "/v2/models/{name}/infer",
        "Inference with the default version (JSON or binary tensors)",
        (V2_TAG,),
        V2InferRequest,
        V2InferResponse,
        {"name": str},
        "v2",
    ),
    LeanRoute(
        "POST",
        "/v2/models/{name}/versions/{version}/infer",
        "Inference with one version (JSON or binary tensors)",
        (V2_TAG,),
        V2InferRequest,
        V2InferResponse,
        {"name": str, "version": str},  # a version that is not a number is the protocol's 404
        "v2",
    ),
)


_EXACT: dict[tuple[str, str], LeanRoute] = {
    (r.method, r.path): r for r in LEAN_ROUTES if not r.params
}
_HEAD = 4  # "/v1/", "/v2/": the routes with parameters, by the start of their path
_BY_HEAD: dict[str, tuple[LeanRoute, ...]] = {}
for _route in LEAN_ROUTES:
    if _route.params:
        _BY_HEAD[_route.path[:_HEAD]] = (*_BY_HEAD.get(_route.path[:_HEAD], ()), _route)


def match_lean(
    method: str, path: str, routes: tuple[LeanRoute, ...] = LEAN_ROUTES
) -> tuple[LeanRoute, dict[str, Any]] | None:
    """The route of ``method path`` and its parameters, or None."""
    if routes is LEAN_ROUTES:
        exact = _EXACT.get((method, path))
        if exact is not None:
            return exact, {}
        routes = _BY_HEAD.get(path[:_HEAD], ())
    for route in routes:
        if route.method == method:
            params = route.match(path)
            if params is not None:
                return route, params
    return None
