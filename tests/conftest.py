"""Fixtures shared by every tier: demo models (trained once), settings, an in-process app."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from inferd.app import InferdApp, create_app
from inferd.models.demo import train_demo
from inferd.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder: unit, integration, e2e or deploy."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in ("unit", "integration", "e2e", "deploy"):
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models, trained once per session; copy before changing them."""
    root = tmp_path_factory.mktemp("demo-models")
    train_demo(root)
    return root


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 of tests/support/textgen.py and its tokenizer, built once per session
    (a save_pretrained folder); copy it before changing it."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.support.textgen import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2") / "model")


@pytest.fixture
def models_dir(tmp_path: Path, demo_models: Path) -> Path:
    """A private copy of the demo repository that a test may add to or break."""
    target = tmp_path / "models"
    shutil.copytree(demo_models, target)
    return target


@pytest.fixture
def make_settings(models_dir: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        overrides.setdefault("models_dir", models_dir)
        overrides.setdefault("gc_freeze", False)
        overrides.setdefault("gc_threshold", 0)  # the test process's collector as Python has it
        overrides.setdefault("data_dir", models_dir.parent / "data")
        return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]

    return make


class Served:
    """An app running in-process with its lifespan, and an httpx client bound to it."""

    def __init__(self, app: InferdApp, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client


@pytest.fixture
def serve(make_settings: Callable[..., Settings]) -> Callable[..., Any]:
    """``async with serve(**settings) as served:`` runs the app until the block ends."""
    import contextlib

    @contextlib.asynccontextmanager
    async def run(wait_ready: bool = True, **overrides: Any) -> AsyncIterator[Served]:
        app = create_app(make_settings(**overrides))
        async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
            if wait_ready:
                await app.wait_ready(within=30)
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://inferd") as client:
                yield Served(app, client)

    return run


@pytest.fixture(autouse=True)
def _no_inferd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from defaults, whatever INFERD_* (or OTEL_*: tracing) the caller's shell
    exports."""
    for key in list(os.environ):
        inferd = key.startswith("INFERD_") and key != "INFERD_TEST_REQUIRE_SERVICES"
        if inferd or key.startswith("OTEL_"):
            monkeypatch.delenv(key)
