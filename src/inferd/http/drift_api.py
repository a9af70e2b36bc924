"""``GET /v1/models/{name}/drift``: each served version's drift window against its reference."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from inferd.errors import ModelNotFound
from inferd.models.registry import ModelRegistry
from inferd.monitoring import Monitor

__all__ = ["build_drift_router"]


def build_drift_router(registry: ModelRegistry, monitor: Monitor | None) -> APIRouter:
    """The drift route; with ``monitor`` None (``drift_enabled = false``) it says drift is off."""
    router = APIRouter()

    @router.get(
        "/v1/models/{name}/drift",
        tags=["models"],
        summary="Data drift and prediction drift of each served version (PSI against its "
        "reference.json)",
        responses={404: {"description": "The model is not served here"}},
    )
    async def drift(name: str) -> dict[str, Any]:
        versions = registry.versions(name)
        if not versions:
            registry.get(name)  # raises, saying why (unknown, or still loading)
            raise ModelNotFound(f"model {name!r} is not served here")
        default = registry.default_version(name)
        body: dict[str, Any] = {"model": name, "enabled": monitor is not None}
        if monitor is None:
            body["detail"] = "drift monitoring is off on this server (INFERD_DRIFT_ENABLED=false)"
            body["versions"] = [
                {
                    "version": v.version_str,
                    "default": v.version == default,
                    "reference": v.reference.describe() if v.reference is not None else None,
                }
                for v in versions
            ]
            return body
        monitor.update()  # figures up to this moment, gauges included
        body["interval_seconds"] = monitor.interval
        body["sampled_rows"] = monitor.sampled_rows
        body["update_seconds_total"] = round(monitor.busy_seconds, 6)
        body["versions"] = [
            {"default": v.version == default, **monitor.report(v)} for v in versions
        ]
        return body

    return router
