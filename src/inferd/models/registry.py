"""The live models: load, validate, warm up, serve through a batcher, drain and unload.

Each served version of a model has its own :class:`LoadedModel` and batcher. What a model
serves (its versions and its default) is one immutable :class:`_Served` record, replaced in
one assignment on the event loop; so a lookup sees either the old set or the new one, never a
half-made one. Changing it follows one order, whatever asked for it (start-up, the admin API,
a rollback, the repository watch):

1. new versions load, are checked on a sample batch and warmed up, while the old ones serve;
   if one fails, nothing changes and the reason is kept (``index()`` shows it);
2. the new record is published: new lookups get the new versions;
3. versions no longer served finish what their queues hold, then unload. A request that
   looked up an old version but had not queued yet finds it retired and looks up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferd.concurrency import run_blocking
from inferd.errors import InferdError, ModelLoadError, ModelNotFound, ModelNotReady
from inferd.logs import get_logger
from inferd.metrics import Metrics
from inferd.models.loading import LoadedModel, ModelState, prepare, warm_up
from inferd.models.repository import Fingerprint, ModelEntry, ModelRepository, Stamp
from inferd.models.runtimes import create_model
from inferd.settings import Settings

__all__ = ["LoadedModel", "ModelRegistry", "ModelState", "create_model"]

log = get_logger("inferd.models")

# The states of the Open Inference Protocol's repository index.
_INDEX_STATES = {
    ModelState.LOADING: "LOADING",
    ModelState.READY: "READY",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNLOADING: "UNLOADING",
    ModelState.UNLOADED: "UNAVAILABLE",
}


@dataclass(frozen=True, eq=False)
class _Served:
    """What one model serves now. Replaced whole, never changed in place."""

    entry: ModelEntry
    versions: dict[int, LoadedModel]
    default: LoadedModel
    stamp: Stamp
    """The model folder as it was read for this set (the repository watch compares it)."""


class ModelRegistry:
    """Loads the configured models from the repository and hands out ready ones."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository = ModelRepository(settings.models_dir)
        self.default_name: str | None = settings.default_model
        self.failure: str | None = None
        self.syncer: Callable[[], object] | None = None
        """Brings the local repository up to date (remote storage); called, in a thread,
        before the repository is read again at run time."""
        self.observe: Callable[[LoadedModel, Any, Any], None] | None = None
        """Called with each answered batch of a version loaded from now on (drift
        monitoring: :meth:`inferd.monitoring.Monitor.observe`)."""
        self._served: dict[str, _Served] = {}
        self._expected: list[str] = []
        self._loading: dict[str, dict[int, LoadedModel]] = {}
        self._draining: dict[str, dict[int, LoadedModel]] = {}
        self._failed: dict[str, dict[int, LoadedModel]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watch_failed: dict[str, Stamp] = {}

    # ------------------------------------------------------------------ lookups
    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The ready ``version`` of ``name`` (its default when None); 404 if unknown, 503 if
        not ready yet."""
        served = self._served.get(name)
        if served is not None:
            loaded = served.default if version is None else served.versions.get(version)
            if loaded is not None and loaded.state is ModelState.READY:
                return loaded
        raise self._absent(name, version)

    def _absent(self, name: str, version: int | None) -> InferdError:
        loading = self._loading.get(name, {})
        served = self._served.get(name)
        if served is None and (name in self._expected or (loading and version is None)):
            failed = self._failed.get(name)
            if failed:
                error = next(iter(failed.values())).error
                return ModelNotReady(f"model {name!r} failed to load: {error}", retry_after=1)
            return ModelNotReady(f"model {name!r} is still loading", retry_after=1)
        if version is not None and version in loading:
            return ModelNotReady(
                f"model {name!r} version {version} is still loading", retry_after=1
            )
        if served is not None:
            if version is not None and version not in served.versions:
                listed = ", ".join(str(v) for v in sorted(served.versions))
                return ModelNotFound(
                    f"model {name!r} has no version {version} loaded (loaded: {listed})"
                )
            # Swapped out between two lines of the caller: a second lookup finds the new one.
            return ModelNotReady(f"model {name!r} is changing versions; retry", retry_after=0)
        known = ", ".join(sorted(self._expected)) or "none"
        return ModelNotFound(f"model {name!r} is not served here (served models: {known})")

    def refresh(self, loaded: LoadedModel, version: int | None = None) -> LoadedModel:
        """``loaded`` while it serves, else ``get(loaded.name, version)``. Call it just before
        queueing a request that looked its model up before an ``await`` (reading the body):
        a version swapped out meanwhile drains and takes no new work. ``version`` is what the
        request asked for (None: the default)."""
        if loaded.state is ModelState.READY:
            return loaded
        return self.get(loaded.name, version)

    def get_default(self) -> LoadedModel:
        if self.default_name is None:
            raise ModelNotFound("no default model is configured (set INFERD_DEFAULT_MODEL)")
        return self.get(self.default_name)

    def find(self, name: str) -> LoadedModel | None:
        """The default version of ``name`` whatever its state; while it is not served yet,
        the version being loaded (or the one that failed)."""
        served = self._served.get(name)
        if served is not None:
            return served.default
        for pending in (self._loading.get(name), self._failed.get(name)):
            if pending:
                return pending[max(pending)]
        return None

    def versions(self, name: str) -> list[LoadedModel]:
        """The versions of ``name`` being served, ascending (``[]`` when it is not served)."""
        served = self._served.get(name)
        return [served.versions[v] for v in sorted(served.versions)] if served else []

    def default_version(self, name: str) -> int | None:
        """The version that requests naming none go to (None when ``name`` is not served)."""
        served = self._served.get(name)
        return served.default.version if served is not None else None

    def all(self) -> list[LoadedModel]:
        """Every served version, and those loading, by name then version."""
        found: dict[tuple[str, int], LoadedModel] = {}
        for name, loading in self._loading.items():
            for version, loaded in loading.items():
                found[(name, version)] = loaded
        for name, served in self._served.items():
            for version, loaded in served.versions.items():
                found[(name, version)] = loaded
        return [found[key] for key in sorted(found)]

    @property
    def expected(self) -> list[str]:
        """The configured models: those planned at start-up and loaded since, less the ones
        the admin unloaded."""
        return list(self._expected)

    @property
    def ready(self) -> bool:
        """True when every configured model is loaded, warmed up and serving."""
        return bool(self._expected) and all(name in self._served for name in self._expected)

    def describe(self, name: str) -> dict[str, Any]:
        """``GET /v1/models/{name}``: the default version's metadata, and every version's
        state, load time and error."""
        loaded = self.find(name)
        if loaded is None:
            raise ModelNotFound(f"model {name!r} is not served here")
        default = self.default_version(name)
        lines: dict[int, LoadedModel] = {}
        for group in (self._failed, self._draining, self._loading):
            lines.update(group.get(name, {}))
        lines.update({m.version: m for m in self.versions(name)})
        return {
            **loaded.describe(),
            "default_version": str(default) if default is not None else None,
            "versions": [lines[v].status(v == default) for v in sorted(lines)],
        }

    async def index(self) -> list[dict[str, Any]]:
        """Every model in the repository (read again) and every version: ``name``,
        ``version``, ``state`` (READY, LOADING, UNLOADING, UNAVAILABLE) and ``reason``."""
        await self._sync_repository()
        scans = await run_blocking(self.repository.scan)
        rows: list[dict[str, Any]] = []
        names = {scan.name for scan in scans}
        for scan in scans:
            rows.extend(self._index_rows(scan.name, scan.on_disk, scan.error))
        for name in sorted((set(self._served) | set(self._loading)) - names):
            rows.extend(self._index_rows(name, (), "its folder is gone from the repository"))
        return rows

    def _index_rows(
        self, name: str, on_disk: tuple[int, ...], error: str | None
    ) -> list[dict[str, Any]]:
        known: dict[int, LoadedModel] = {}
        for group in (self._failed, self._draining, self._loading):
            known.update(group.get(name, {}))
        known.update({m.version: m for m in self.versions(name)})
        versions = sorted(set(on_disk) | set(known))
        if not versions:
            return [{"name": name, "version": "", "state": "UNAVAILABLE", "reason": error or ""}]
        rows = []
        for version in versions:
            loaded = known.get(version)
            if loaded is not None:
                state = _INDEX_STATES[loaded.state]
                reason = loaded.error or ("" if loaded.ready else loaded.state.value)
            else:
                state, reason = "UNAVAILABLE", error or "not loaded"
            rows.append({"name": name, "version": str(version), "state": state, "reason": reason})
        return rows

    # ------------------------------------------------------------------ start-up
    def plan(self) -> list[ModelEntry]:
        """Read the repository and decide what to serve; raises ConfigError when it is wrong."""
        entries = self.repository.entries(self.settings.models)
        if not entries:
            raise ModelLoadError(
                f"no models in {self.repository.root}; run `inferd models train-demo` to create "
                "the demo models"
            )
        self._expected = [entry.name for entry in entries]
        if self.default_name is None:
            self.default_name = "iris" if "iris" in self._expected else self._expected[0]
        elif self.default_name not in self._expected:
            raise ModelLoadError(
                f"default model {self.default_name!r} is not among the served models "
                f"({', '.join(self._expected)})"
            )
        return entries

    async def load_all(self, entries: list[ModelEntry] | None = None) -> None:
        """Load the planned models one after the other; the first failure raises."""
        for entry in entries if entries is not None else self.plan():
            async with self._lock(entry.name):
                stamp = await run_blocking(self.repository.stamp, entry.name)
                await self._apply(entry, entry.wanted, stamp)

    # ------------------------------------------------------------------ live changes
    async def load_model(self, name: str, versions: list[int] | None = None) -> list[LoadedModel]:
        """Serve ``name`` as the repository holds it now: ``versions``, or the ones its version
        policy picks. Versions that are new or changed on disk load and warm up before traffic
        moves to them; versions no longer wanted drain, then unload. If one fails, what was
        served stays served and ModelLoadError says why. Returns the versions served."""
        async with self._lock(name):
            await self._sync_repository()
            return await self._load(name, versions)

    async def _load(self, name: str, versions: list[int] | None) -> list[LoadedModel]:
        """:meth:`load_model` once the model's lock is held and the repository synced."""
        stamp = await run_blocking(self.repository.stamp, name)
        entry = await run_blocking(self.repository.read, name)
        if versions is not None:
            missing = sorted(set(versions) - set(entry.versions))
            if missing or not versions:
                raise ModelNotFound(
                    f"model {name!r} has no version {', '.join(map(str, missing)) or '(none)'}"
                    f" in the repository (versions: {', '.join(map(str, entry.versions))})"
                )
        return await self._apply(entry, sorted(set(versions or entry.wanted)), stamp)

    async def unload_model(self, name: str) -> None:
        """Stop serving ``name``: new requests get 404 at once, queued ones finish, then every
        version unloads. It is no longer part of the configured set (``/health/ready``)."""
        async with self._lock(name):
            served = self._served.pop(name, None)
            if served is None:
                raise ModelNotFound(f"model {name!r} is not loaded")
            if name in self._expected:
                self._expected.remove(name)
            self._failed.pop(name, None)
            self._watch_failed.pop(name, None)
            log.info(
                "model swap",
                model=name,
                from_version=served.default.version,
                to_version=None,
                ms=0.0,
            )
            await self._retire(list(served.versions.values()))

    async def set_default(self, name: str, version: int) -> None:
        """Make ``version`` the one answering requests that name none (a rollback), loading
        it beside the others first if it is not loaded. It lasts until the model is loaded
        again."""
        async with self._lock(name):
            served = self._served.get(name)
            if served is None:
                raise ModelNotFound(f"model {name!r} is not loaded; load it first")
            if version in served.versions:
                if served.default.version != version:
                    self._publish(served.entry, served.versions, version, served.stamp, 0.0)
                return
            await self._sync_repository()
            stamp = await run_blocking(self.repository.stamp, name)
            entry = await run_blocking(self.repository.read, name)
            if version not in entry.versions:
                raise ModelNotFound(
                    f"model {name!r} has no version {version} in the repository "
                    f"(versions: {', '.join(map(str, entry.versions))})"
                )
            await self._apply(entry, sorted({*served.versions, version}), stamp, default=version)

    async def poll_repository(self) -> list[str]:
        """One look at the folders of the served models: load those that changed on disk
        (the repository watch). A change that failed to load is not retried until the folder
        changes again. Returns the names loaded."""
        await self._sync_repository()
        changed = []
        for name in list(self._served):
            async with self._lock(name):  # an admin change in between wins
                served = self._served.get(name)
                if served is None:
                    continue  # unloaded meanwhile: not watched any more
                stamp = await run_blocking(self.repository.stamp, name)
                if stamp in (served.stamp, self._watch_failed.get(name)) or not stamp[1]:
                    continue  # unchanged, failed as it is, or gone: keep what is loaded
                try:
                    await self._load(name, None)
                except InferdError as exc:
                    self._watch_failed[name] = stamp
                    log.warning("repository watch: load failed", model=name, detail=exc.message)
                else:
                    self._watch_failed.pop(name, None)
                    changed.append(name)
        return changed

    async def _sync_repository(self) -> None:
        """Bring the local repository up to date (remote storage) before it is read again."""
        if self.syncer is not None:
            await run_blocking(self.syncer)

    def _lock(self, name: str) -> asyncio.Lock:
        """One change at a time per model (admin calls, the watch, start-up)."""
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def _apply(
        self, entry: ModelEntry, wanted: list[int], stamp: Stamp, default: int | None = None
    ) -> list[LoadedModel]:
        """Load what ``wanted`` lacks, publish the new set, retire what it no longer has."""
        started = time.perf_counter()
        name = entry.name
        for version in wanted:
            try:
                await run_blocking(self.repository.check, entry, [version])
            except ModelLoadError as exc:
                self._failure(entry, version, exc.message, 0.0)
                raise
        current = self._served.get(name)
        old = dict(current.versions) if current is not None else {}
        prints = dict(stamp[1])
        keep: dict[int, LoadedModel] = {}
        fresh: list[LoadedModel] = []
        try:
            for version in wanted:
                was = old.get(version)
                fingerprint = prints.get(version, ())
                if was is not None and was.spec == entry.spec and was.fingerprint == fingerprint:
                    keep[version] = was
                    continue
                fresh.append(await self._load_version(entry, version, fingerprint))
        except BaseException:
            await self._retire(fresh, quiet=True)  # never served: nothing to drain
            raise
        versions = {**keep, **{m.version: m for m in fresh}}
        failed = self._failed.get(name, {})
        for version in [v for v in failed if v not in entry.versions]:
            del failed[version]  # its folder is gone: nothing left to report
        chosen = default if default is not None else _default_of(entry, versions)
        self._publish(entry, versions, chosen, stamp, (time.perf_counter() - started) * 1000)
        await self._retire([m for v, m in old.items() if versions.get(v) is not m])
        return [versions[v] for v in sorted(versions)]

    def _publish(
        self,
        entry: ModelEntry,
        versions: dict[int, LoadedModel],
        default: int,
        stamp: Stamp,
        ms: float,
    ) -> None:
        """Make ``versions`` what ``entry`` serves, in one assignment; log a default change."""
        name, m = entry.name, self.metrics
        current = self._served.get(name)
        for loaded in current.versions.values() if current is not None else ():
            if versions.get(loaded.version) is not loaded:
                loaded.state = ModelState.UNLOADING  # late arrivals look up again
        self._served[name] = _Served(entry, versions, versions[default], stamp)
        if name not in self._expected:
            self._expected.append(name)
        for loaded in versions.values():
            vstr, batcher = loaded.version_str, loaded.batcher
            m.model_version_info.labels(name, vstr, entry.spec.runtime).set(1)
            m.model_ready.labels(name, vstr).set(1)
            if batcher is not None:
                m.queue_depth.labels(name, vstr).set_function(_depth_of(batcher))
            if loaded.scheduler is not None:
                m.queue_depth.labels(name, vstr).set_function(_depth_of(loaded.scheduler))
        previous = current.default.version if current is not None else None
        if previous != default:
            log.info(
                "model swap", model=name, from_version=previous, to_version=default, ms=round(ms, 2)
            )

    async def _retire(self, models: list[LoadedModel], quiet: bool = False) -> None:
        """Let each version finish its queued requests, then unload it."""
        if not models:
            return
        for loaded in models:
            loaded.state = ModelState.UNLOADING
            self._draining.setdefault(loaded.name, {})[loaded.version] = loaded
        await asyncio.gather(*(self._unload_version(m, quiet) for m in models))

    async def _unload_version(self, loaded: LoadedModel, quiet: bool) -> None:
        started = time.perf_counter()
        name, vstr = loaded.name, loaded.version_str
        try:
            if loaded.batcher is not None:
                await loaded.batcher.stop(self.settings.version_drain_seconds)
            if loaded.scheduler is not None:
                await loaded.scheduler.stop(self.settings.version_drain_seconds)
            await run_blocking(loaded.model.unload)
        except Exception as exc:  # the version is gone either way; say what went wrong
            log.warning("model unload failed", model=name, version=loaded.version, detail=repr(exc))
        finally:
            loaded.state = ModelState.UNLOADED
            draining = self._draining.get(name, {})
            if draining.get(loaded.version) is loaded:
                del draining[loaded.version]
        served = self._served.get(name)
        if served is None or loaded.version not in served.versions:
            # No newer load of the same version took these series over.
            m = self.metrics
            m.model_version_info.labels(name, vstr, loaded.spec.runtime).set(0)
            _remove(m.model_ready, name, vstr)
            _remove(m.queue_depth, name, vstr)
        if not quiet:
            log.info(
                "model unload",
                model=name,
                from_version=loaded.version,
                to_version=None,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )

    def _failure(
        self,
        entry: ModelEntry,
        version: int,
        error: str,
        seconds: float,
        loaded: LoadedModel | None = None,
    ) -> None:
        """Count, log and keep a failed load of ``version`` (``index()`` and ``describe()``
        show it until that version loads or its folder goes)."""
        if loaded is None:
            # Only a record of the failure: a runtime that cannot even be made is not kept.
            with contextlib.suppress(Exception):
                model = create_model(entry.spec, version, entry.artifact(version))
                loaded = LoadedModel(entry, version, model, None, version_str=str(version))
        if loaded is not None:
            loaded.state = ModelState.FAILED
            loaded.error = error
            self._failed.setdefault(entry.name, {})[version] = loaded
        self.metrics.model_load_failures.labels(entry.name, str(version)).inc()
        log.error(
            "model load failed",
            model=entry.name,
            version=version,
            ms=round(seconds * 1000, 2),
            detail=error,
        )

    async def _load_version(
        self, entry: ModelEntry, version: int, fingerprint: Fingerprint = ()
    ) -> LoadedModel:
        """Load, validate and warm up one version; it serves once published."""
        spec, vstr, m = entry.spec, str(version), self.metrics
        loaded = prepare(entry, version, self.settings, m, fingerprint, self.observe)
        batcher = loaded.batcher
        served = self._served.get(spec.name)
        if served is None or version not in served.versions:
            m.model_ready.labels(spec.name, vstr).set(0)
        self._loading.setdefault(spec.name, {})[version] = loaded
        started = time.perf_counter()
        try:
            await warm_up(loaded)
        except Exception as exc:
            error = exc.message if isinstance(exc, InferdError) else repr(exc)
            self._failure(entry, version, error, time.perf_counter() - started, loaded)
            if batcher is not None:
                await batcher.stop(0)
            if loaded.scheduler is not None:
                await loaded.scheduler.stop(0)
            if served is None or version not in served.versions:
                _remove(m.model_ready, spec.name, vstr)
            if isinstance(exc, InferdError):
                raise
            raise ModelLoadError(f"model {spec.name!r} version {version}: {exc!r}") from exc
        finally:
            loading = self._loading.get(spec.name, {})
            loading.pop(version, None)
            if not loading:
                self._loading.pop(spec.name, None)
        self._failed.get(spec.name, {}).pop(version, None)
        loaded.load_seconds = time.perf_counter() - started
        loaded.loaded_at = time.time()
        if batcher is not None:
            batcher.start()
        m.model_load_seconds.labels(spec.name, vstr).set(loaded.load_seconds)
        loaded.state = ModelState.READY
        log.info(
            "model load",
            model=spec.name,
            from_version=None,
            to_version=version,
            ms=round(loaded.load_seconds * 1000, 2),
            runtime=spec.runtime,
            fast_path=loaded.model.capabilities.fast_path,
        )
        return loaded

    async def stop(self, grace: float = 5.0) -> None:
        """Drain every batcher within ``grace`` seconds and unload the models."""
        models = [m for served in self._served.values() for m in served.versions.values()]
        self._served.clear()
        for loaded in models:
            loaded.state = ModelState.UNLOADING
        await asyncio.gather(
            *(m.batcher.stop(grace) for m in models if m.batcher is not None),
            *(m.scheduler.stop(grace) for m in models if m.scheduler is not None),
            return_exceptions=True,
        )
        for loaded in models:
            self.metrics.model_ready.labels(loaded.name, loaded.version_str).set(0)
            self.metrics.model_version_info.labels(
                loaded.name, loaded.version_str, loaded.spec.runtime
            ).set(0)
            loaded.model.unload()
            loaded.state = ModelState.UNLOADED


def _default_of(entry: ModelEntry, versions: dict[int, LoadedModel]) -> int:
    """``[versions] default`` when it is served, else the highest version served."""
    configured = entry.spec.versions.default
    return configured if configured in versions else max(versions)


def _depth_of(batcher: Any) -> Callable[[], float]:
    return lambda: batcher.depth


def _remove(gauge: Any, *labels: str) -> None:
    """Drop a labelled series (a version no longer served reports nothing, not a stale value)."""
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)
