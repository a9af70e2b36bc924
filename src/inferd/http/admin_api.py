"""The admin API: the repository index, and loading, unloading and rolling back models.

Every route is under ``/v1/admin/`` and needs the ``admin`` scope once API keys are on
(:func:`inferd.tenancy.auth.required_scope`). The work is the registry's; this module parses
the request, calls it and renders the answer.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict, Field

from inferd.errors import InferdError, ModelLoadError
from inferd.http.schemas import ErrorBody
from inferd.models.registry import ModelRegistry
from inferd.models.spec import SplitSpec
from inferd.serving.traffic import Traffic

__all__ = ["LoadFailed", "build_admin_router"]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        401: "No valid API key",
        403: "The key lacks the admin scope",
        404: "Unknown model, or no such version in the repository",
        422: "The body is not what the route takes",
    }.items()
}


class LoadFailed(InferdError):
    """A version could not be loaded; what was served before still is."""

    status_code = 409
    code = "model_load_failed"


class LoadRequest(BaseModel):
    """Optional body of ``POST /v1/admin/models/{name}/load``."""

    model_config = ConfigDict(extra="forbid")

    versions: list[int] | None = Field(default=None, min_length=1, max_length=64)
    """The versions to serve; unset: the ones ``model.toml``'s version policy picks."""


class DefaultRequest(BaseModel):
    """Body of ``POST /v1/admin/models/{name}/default``."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    """The version that requests naming none go to from now on."""


def build_admin_router(registry: ModelRegistry, traffic: Traffic | None = None) -> APIRouter:
    """Routes that change what is served, for operators."""
    router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=_ERRORS)

    def state(name: str) -> dict[str, Any]:
        described = registry.describe(name)
        return {
            "name": name,
            "default_version": described["default_version"],
            "versions": described["versions"],
        }

    @router.get("/repository", summary="Every model and version in the repository, and its state")
    async def repository() -> dict[str, Any]:
        rows = await registry.index()
        for row in rows:
            default = registry.default_version(row["name"])
            row["default"] = default is not None and row["version"] == str(default)
        return {"repository": str(registry.repository.root), "models": rows}

    @router.post(
        "/models/{name}/load",
        summary="Load or reload a model: new versions warm up before traffic moves to them",
        responses={
            409: {"model": ErrorBody, "description": "A version failed; the old one serves"}
        },
    )
    async def load(name: str, body: LoadRequest | None = Body(default=None)) -> dict[str, Any]:
        versions = body.versions if body is not None else None
        try:
            await registry.load_model(name, versions)
        except ModelLoadError as exc:
            raise LoadFailed(exc.message) from exc
        return state(name)

    @router.post(
        "/models/{name}/unload",
        summary="Stop serving a model once its queued requests are answered",
    )
    async def unload(name: str) -> dict[str, Any]:
        await registry.unload_model(name)
        return {"name": name, "unloaded": True}

    @router.post(
        "/models/{name}/default",
        summary="Make a version the default (a rollback), loading it first if needed",
        responses={409: {"model": ErrorBody, "description": "It failed to load; no change"}},
    )
    async def set_default(name: str, body: DefaultRequest) -> dict[str, Any]:
        previous = registry.default_version(name)
        try:
            await registry.set_default(name, body.version)
        except ModelLoadError as exc:
            raise LoadFailed(exc.message) from exc
        return {**state(name), "previous_default": str(previous) if previous else None}

    if traffic is not None:
        _split_routes(router, registry, traffic)
    return router


def _split_routes(router: APIRouter, registry: ModelRegistry, traffic: Traffic) -> None:
    """``/v1/admin/models/{name}/split``: read, set and clear a model's traffic split."""

    def answer(name: str) -> dict[str, Any]:
        split = traffic.split_of(name)
        return {"name": name, "split": split.describe() if split is not None else None}

    @router.get("/models/{name}/split", summary="The split in force between a model's versions")
    async def get_split(name: str) -> dict[str, Any]:
        if not registry.versions(name):
            registry.get(name)  # 404 or 503
        return answer(name)

    @router.put(
        "/models/{name}/split",
        summary="Share the requests naming no version between served versions, by weight",
        responses={404: {"model": ErrorBody, "description": "A version named is not served"}},
    )
    async def put_split(name: str, body: SplitSpec) -> dict[str, Any]:
        traffic.set(name, body)
        return answer(name)

    @router.delete(
        "/models/{name}/split",
        summary="Drop the split set at run time (model.toml's, if any, is in force again)",
    )
    async def delete_split(name: str) -> dict[str, Any]:
        if not registry.versions(name):
            registry.get(name)
        traffic.clear(name)
        return answer(name)
