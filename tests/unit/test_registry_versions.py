"""Version policies and the registry's live changes: load, swap, drain, rollback, unload."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from inferd.errors import ModelLoadError, ModelNotFound, ModelNotReady
from inferd.metrics import Metrics
from inferd.models.registry import ModelRegistry, ModelState
from inferd.models.repository import ModelRepository
from inferd.models.spec import VersionsSpec
from inferd.settings import Settings
from tests.support.models import write_scripted_model

ROW = np.array([[1.0, 0.0, 0.0, 0.0]])


def write_versions(
    root: Path, versions: tuple[int, ...], policy: str = "", **behaviour: Any
) -> Path:
    """``root/m`` with a scripted model in each version folder and ``policy`` appended to its
    ``model.toml`` (a ``[versions]`` table)."""
    for version in versions:
        write_scripted_model(root, "m", version, **behaviour)
    toml = root / "m" / "model.toml"
    if policy:
        toml.write_text(toml.read_text() + "[versions]\n" + policy + "\n")
    return root / "m"


def break_version(root: Path, version: int) -> None:
    """A version whose sample batch raises at load: it must never serve."""
    write_scripted_model(root, "m", version, fail_on=0.0)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def make_registry(repo: Path, tmp_path: Path) -> Callable[..., ModelRegistry]:
    def make(**overrides: Any) -> ModelRegistry:
        settings = Settings(
            _env_file=None,
            models_dir=repo,
            data_dir=tmp_path / "data",
            gc_freeze=False,
            version_drain_seconds=5.0,
            **overrides,
        )
        return ModelRegistry(settings, Metrics())

    return make


@pytest.fixture
async def registries() -> AsyncIterator[list[ModelRegistry]]:
    """Registries to stop at the end of the test (their batchers own threads)."""
    started: list[ModelRegistry] = []
    yield started
    for registry in started:
        await registry.stop(grace=1.0)


async def start(registry: ModelRegistry, registries: list[ModelRegistry]) -> ModelRegistry:
    registries.append(registry)
    await registry.load_all(registry.plan())
    return registry


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    for _ in range(int(within / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition did not come true in time")


def metric_lines(registry: ModelRegistry, family: str) -> list[str]:
    text = generate_latest(registry.metrics.registry).decode()
    return [line for line in text.splitlines() if line.startswith(family + "{")]


# ---------------------------------------------------------------------------- the policy
def test_latest_policy_serves_the_highest_count_versions() -> None:
    assert VersionsSpec().select((1, 2, 5)) == [5]
    assert VersionsSpec(count=2).select((1, 2, 5)) == [2, 5]
    assert VersionsSpec(count=9).select((1, 2)) == [1, 2]


def test_specific_policy_serves_exactly_the_listed_versions() -> None:
    spec = VersionsSpec(policy="specific", versions=[3, 1, 3])
    assert spec.select((1, 2, 3, 4)) == [1, 3]
    assert spec.select((1,)) == [1, 3]  # 3 stays: loading it says it is missing


@pytest.mark.parametrize(
    ("table", "complaint"),
    [
        ('policy = "specific"', 'policy = "specific" needs versions'),
        (
            'policy = "specific"\nversions = [1]\ncount = 2',
            'versions.count is for policy = "latest"',
        ),
        ("versions = [1]", 'versions.versions is for policy = "specific"'),
        (
            'policy = "specific"\nversions = [1, 2]\ndefault = 3',
            "versions.default (3) is not among",
        ),
        ('policy = "newest"', "versions.policy"),
        ("count = 0", "versions.count"),
        ("every = 1", "versions.every"),
    ],
)
def test_a_wrong_versions_table_is_refused_naming_the_problem(
    repo: Path, table: str, complaint: str
) -> None:
    write_versions(repo, (1, 2), table)

    with pytest.raises(ModelLoadError) as info:
        ModelRepository(repo).get("m")

    assert complaint in info.value.message
    assert "model.toml" in info.value.message


def test_a_specific_version_missing_on_disk_fails_start_up(repo: Path) -> None:
    write_versions(repo, (1, 2), 'policy = "specific"\nversions = [1, 3]')

    with pytest.raises(
        ModelLoadError, match=r"version 3: no folder .*m/3 \(versions on disk: 1, 2\)"
    ):
        ModelRepository(repo).get("m")


def test_a_default_outside_the_policy_fails_start_up(repo: Path) -> None:
    write_versions(repo, (1, 2, 3), "count = 2\ndefault = 1")

    with pytest.raises(ModelLoadError, match=r"versions.default = 1 is not among .* \(2, 3\)"):
        ModelRepository(repo).get("m")


# ---------------------------------------------------------------------------- start-up
async def test_latest_two_serves_both_and_the_highest_by_default(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_versions(repo, (1, 2, 3), "count = 2")
    registry = await start(make_registry(), registries)

    assert [m.version for m in registry.versions("m")] == [2, 3]
    assert registry.default_version("m") == 3
    assert registry.get("m").version == 3
    assert registry.get("m", 2).version == 2
    assert [(m.name, m.version) for m in registry.all()] == [("m", 2), ("m", 3)]
    with pytest.raises(ModelNotFound, match=r"no version 1 loaded \(loaded: 2, 3\)"):
        registry.get("m", 1)
    assert registry.ready


async def test_a_configured_default_wins_over_the_highest(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_versions(repo, (1, 2, 3), 'policy = "specific"\nversions = [1, 3]\ndefault = 1')
    registry = await start(make_registry(), registries)

    assert [m.version for m in registry.versions("m")] == [1, 3]
    assert registry.get("m").version == 1


# ---------------------------------------------------------------------------- live changes
async def test_a_new_version_takes_over_and_the_old_one_unloads(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_versions(repo, (1,))
    registry = await start(make_registry(), registries)
    old = registry.get("m")
    write_scripted_model(repo, "m", 2)

    served = await registry.load_model("m")

    assert [m.version for m in served] == [2]
    assert registry.get("m").version == 2
    assert old.state is ModelState.UNLOADED
    with pytest.raises(ModelNotFound):
        registry.get("m", 1)
    assert registry.refresh(old) is registry.get("m")  # looked up before the swap: go on to 2
    assert registry.refresh(registry.get("m")) is registry.get("m")
    with pytest.raises(ModelNotFound):
        registry.refresh(old, 1)  # asked for version 1 itself, which is gone
    assert metric_lines(registry, "model_version_info") == [
        'model_version_info{model="m",runtime="python",version="1"} 0.0',
        'model_version_info{model="m",runtime="python",version="2"} 1.0',
    ]
    assert metric_lines(registry, "inference_model_ready") == [
        'inference_model_ready{model="m",version="2"} 1.0'
    ]


async def test_unchanged_versions_are_kept_not_reloaded(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_versions(repo, (1, 2), "count = 2")
    registry = await start(make_registry(), registries)
    before = registry.versions("m")
    (repo / "m" / "2" / "behaviour.json").write_text(json.dumps({"delay_s": 0.0, "v": 2}))

    after = await registry.load_model("m")

    assert after[0] is before[0]  # version 1 untouched
    assert after[1] is not before[1]  # version 2's folder changed: loaded again
    assert before[1].state is ModelState.UNLOADED
    assert registry.get("m", 2) is after[1]


async def test_requests_queued_on_the_old_version_finish_during_the_swap(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_versions(repo, (1,), delay_s=0.3)
    registry = await start(make_registry(), registries)
    old = registry.get("m")
    assert old.batcher is not None
    deadline = asyncio.get_running_loop().time() + 10
    queued = [old.batcher.submit(ROW, 1, deadline) for _ in range(3)]
    write_scripted_model(repo, "m", 2)

    swap = asyncio.create_task(registry.load_model("m"))
    await eventually(lambda: registry.default_version("m") == 2)  # before the old one drained
    during = registry.get("m")
    draining = old.state
    await swap
    answers = await asyncio.gather(*queued)

    assert during.version == 2
    assert draining is ModelState.UNLOADING
    assert all(out.shape == (1, 3) and out[0].argmax() == 1 for out, *_ in answers)
    assert old.state is ModelState.UNLOADED


async def test_a_version_that_fails_leaves_the_old_one_serving(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_versions(repo, (1,))
    registry = await start(make_registry(), registries)
    break_version(repo, 2)

    with pytest.raises(ModelLoadError, match=r"cannot score a row whose first feature is 0\.0"):
        await registry.load_model("m")

    assert registry.get("m").version == 1
    assert registry.get("m").state is ModelState.READY
    rows = {row["version"]: row for row in await registry.index()}
    assert rows["1"]["state"] == "READY"
    assert rows["2"]["state"] == "UNAVAILABLE"
    assert "cannot score a row" in rows["2"]["reason"]
    described = {v["version"]: v for v in registry.describe("m")["versions"]}
    assert described["2"]["state"] == "failed"
    assert 'inference_model_load_failures_total{model="m",version="2"} 1.0' in metric_lines(
        registry, "inference_model_load_failures_total"
    )
    assert metric_lines(registry, "inference_model_ready") == [
        'inference_model_ready{model="m",version="1"} 1.0'
    ]
    # Fixed on disk, it loads and the failure is forgotten.
    write_scripted_model(repo, "m", 2)
    await registry.load_model("m")
    assert registry.get("m").version == 2
    assert {r["version"]: r["state"] for r in await registry.index()} == {
        "1": "UNAVAILABLE",
        "2": "READY",
    }


async def test_explicit_versions_and_unknown_ones(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_versions(repo, (1, 2, 3))
    registry = await start(make_registry(), registries)

    await registry.load_model("m", [1, 2])
    with pytest.raises(
        ModelNotFound, match=r"no version 7 in the repository \(versions: 1, 2, 3\)"
    ):
        await registry.load_model("m", [1, 7])
    with pytest.raises(ModelNotFound, match="'nope' is not in the repository"):
        await registry.load_model("nope")

    assert [m.version for m in registry.versions("m")] == [1, 2]
    assert registry.default_version("m") == 2


async def test_rollback_makes_an_older_version_the_default(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_versions(repo, (1, 2))
    registry = await start(make_registry(), registries)
    assert [m.version for m in registry.versions("m")] == [2]

    await registry.set_default("m", 1)  # not loaded: loaded beside 2 first

    assert registry.get("m").version == 1
    assert [m.version for m in registry.versions("m")] == [1, 2]
    await registry.set_default("m", 2)  # loaded: one assignment
    assert registry.get("m").version == 2
    with pytest.raises(ModelNotFound, match="no version 9"):
        await registry.set_default("m", 9)
    with pytest.raises(ModelNotFound, match="load it first"):
        await registry.set_default("other", 1)


async def test_unload_takes_the_model_out_of_the_configured_set(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_versions(repo, (1,))
    write_scripted_model(repo, "n", 1)
    registry = await start(make_registry(), registries)
    old = registry.get("m")

    await registry.unload_model("m")

    assert old.state is ModelState.UNLOADED
    assert registry.expected == ["n"]
    assert registry.ready
    with pytest.raises(ModelNotFound, match=r"not served here \(served models: n\)"):
        registry.get("m")
    with pytest.raises(ModelNotFound, match="is not loaded"):
        await registry.unload_model("m")
    assert {r["name"]: r["reason"] for r in await registry.index()}["m"] == "not loaded"
    await registry.load_model("m")  # and back
    assert registry.expected == ["n", "m"]
    assert registry.get("m").version == 1


async def test_a_model_loading_for_the_first_time_is_not_ready_yet(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_scripted_model(repo, "n", 1)
    registry = await start(make_registry(), registries)
    write_scripted_model(repo, "slow", 1, load_delay_s=0.3)

    loading = asyncio.create_task(registry.load_model("slow"))
    await eventually(lambda: registry.find("slow") is not None)
    with pytest.raises(ModelNotReady, match="still loading"):
        registry.get("slow")
    assert {r["name"]: r["state"] for r in await registry.index()}["slow"] == "LOADING"
    assert registry.expected == ["n"]  # readiness does not flip while it loads
    await loading
    assert registry.get("slow").version == 1


async def test_the_repository_watch_loads_what_changed_once(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_versions(repo, (1,))
    registry = await start(make_registry(), registries)
    assert await registry.poll_repository() == []

    break_version(repo, 2)
    assert await registry.poll_repository() == []  # failed: version 1 still serves
    assert await registry.poll_repository() == []  # and it is not tried again
    assert registry.describe("m")["versions"][-1]["state"] == "failed"
    write_scripted_model(repo, "m", 2)  # fixed
    assert await registry.poll_repository() == ["m"]
    assert registry.get("m").version == 2

    shutil.rmtree(repo / "m" / "2")  # removed: back to the highest left
    assert await registry.poll_repository() == ["m"]
    assert registry.get("m").version == 1

    await registry.unload_model("m")  # the admin's choice: no longer watched
    write_scripted_model(repo, "m", 3)
    assert await registry.poll_repository() == []
    with pytest.raises(ModelNotFound):
        registry.get("m")


async def test_the_syncer_runs_before_the_repository_is_read_again(
    repo: Path, make_registry: Callable[..., ModelRegistry], registries: list[ModelRegistry]
) -> None:
    write_versions(repo, (1,))
    registry = await start(make_registry(), registries)
    calls: list[int] = []

    def sync() -> None:  # a remote repository would download version 2 here
        calls.append(1)
        write_scripted_model(repo, "m", 2)

    registry.syncer = sync
    await registry.load_model("m")

    assert calls == [1]
    assert registry.get("m").version == 2
