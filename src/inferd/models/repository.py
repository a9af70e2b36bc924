"""The model repository: a folder of ``<name>/model.toml`` and ``<name>/<version>/<artifact>``.

Every method reads the disk (blocking): at run time the registry calls them through
:func:`~inferd.concurrency.run_blocking`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from inferd.errors import ConfigError, InferdError, ModelLoadError, ModelNotFound
from inferd.models.spec import ModelSpec, load_spec

__all__ = ["Fingerprint", "ModelEntry", "ModelRepository", "ScanResult", "Stamp"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Fingerprint = tuple[tuple[str, int, int], ...]
"""What a version folder looks like on disk: ``(relative path, size, mtime_ns)`` of each file.
Two equal fingerprints mean the version need not be loaded again."""

Stamp = tuple[tuple[int, int], tuple[tuple[int, Fingerprint], ...]]
"""What a model folder looks like on disk: ``model.toml``'s size and mtime, and the fingerprint
of each version folder."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A model as the repository holds it: its spec and the versions on disk."""

    spec: ModelSpec
    folder: Path
    versions: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def latest(self) -> int:
        return self.versions[-1]

    @property
    def wanted(self) -> list[int]:
        """The versions that ``model.toml``'s ``[versions]`` policy serves, ascending."""
        return self.spec.versions.select(self.versions)

    def artifact(self, version: int) -> Path:
        name = self.spec.artifact_name
        folder = self.folder / str(version)
        return folder / name if name is not None else folder


@dataclass(frozen=True, slots=True)
class ScanResult:
    """One model folder as :meth:`ModelRepository.scan` found it: an entry, or why not."""

    name: str
    entry: ModelEntry | None
    error: str | None
    on_disk: tuple[int, ...]
    """Version folders present, whether or not the spec could be read."""


class ModelRepository:
    """Reads model specs and artifact paths from one folder and never from anywhere else."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()

    def names(self) -> list[str]:
        """Names of the folders that hold a ``model.toml``, sorted."""
        if not self.root.is_dir():
            raise ConfigError(
                f"model repository {str(self.root)!r} does not exist; create it or run "
                "`inferd models train-demo` to write the demo models there"
            )
        return sorted(
            child.name
            for child in self.root.iterdir()
            if child.is_dir() and (child / "model.toml").is_file() and _NAME.match(child.name)
        )

    def read(self, name: str) -> ModelEntry:
        """The model ``name`` and its version folders, without looking at the artifacts."""
        if not _NAME.match(name):
            raise ModelNotFound(f"{name!r} is not a valid model name")
        folder = self._inside(self.root / name)
        if not (folder / "model.toml").is_file():
            raise ModelNotFound(f"model {name!r} is not in the repository {str(self.root)!r}")
        spec = load_spec(folder / "model.toml", name)
        versions = _version_folders(folder)
        if not versions:
            raise ModelLoadError(
                f"model {name!r}: no version folder in {folder} "
                f"(expected {folder}/1/{spec.artifact_name or ''})"
            )
        return ModelEntry(spec=spec, folder=folder, versions=versions)

    def get(self, name: str, versions: Sequence[int] | None = None) -> ModelEntry:
        """The model ``name``, having checked that the artifacts of ``versions`` (by default
        the ones its version policy serves) are there; raises naming what is missing."""
        entry = self.read(name)
        if versions is not None:
            self.check(entry, versions)
            return entry
        wanted = entry.wanted
        self.check(entry, wanted)
        default = entry.spec.versions.default
        if default is not None and default not in wanted:
            raise ModelLoadError(
                f"model {entry.name!r}: versions.default = {default} is not among the versions "
                f"its policy serves ({_listed(tuple(wanted))}); serve it or change the default"
            )
        return entry

    def check(self, entry: ModelEntry, versions: Sequence[int]) -> None:
        """Raise ModelLoadError unless every version in ``versions`` has its artifact."""
        for version in versions:
            if version not in entry.versions:
                folder = entry.folder / str(version)
                raise ModelLoadError(
                    f"model {entry.name!r} version {version}: no folder {folder} "
                    f"(versions on disk: {_listed(entry.versions)})"
                )
            path = self._inside(entry.artifact(version))
            if not path.exists():
                raise ModelLoadError(f"model {entry.name!r} version {version}: {path} is missing")

    def entries(self, names: list[str] | None = None) -> list[ModelEntry]:
        """Entries for ``names`` (every model when None); raises on the first bad one."""
        wanted = names if names is not None else self.names()
        return [self.get(name) for name in wanted]

    def scan(self) -> list[ScanResult]:
        """Every model folder, each with its entry or the reason it cannot be read."""
        results = []
        for name in self.names():
            folder = self.root / name
            try:
                entry = self.read(name)
            except InferdError as exc:
                on_disk = _version_folders(folder) if folder.is_dir() else ()
                results.append(ScanResult(name, None, exc.message, on_disk))
            else:
                results.append(ScanResult(name, entry, None, entry.versions))
        return results

    def fingerprint(self, name: str, version: int) -> Fingerprint:
        """Size and modification time of every file in a version folder (``()`` when it is
        gone), so that a rewritten artifact is noticed and an untouched one is not."""
        folder = self.root / name / str(version)
        try:
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            return tuple(
                (str(p.relative_to(folder)), (st := p.stat()).st_size, st.st_mtime_ns)
                for p in files
            )
        except OSError:  # removed while we looked: the next look sees it gone
            return ()

    def stamp(self, name: str) -> Stamp:
        """What ``<name>`` looks like on disk: its ``model.toml`` and every version folder.
        Taken before the files are read, so a change made while they load is seen later."""
        try:
            stat = (self.root / name / "model.toml").stat()
            spec = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            spec = (0, 0)
        return (spec, tuple((v, self.fingerprint(name, v)) for v in self.version_folders(name)))

    def version_folders(self, name: str) -> tuple[int, ...]:
        """The version folders of ``name`` (``()`` when the model folder is gone)."""
        folder = self.root / name
        return _version_folders(folder) if folder.is_dir() else ()

    def _inside(self, path: Path) -> Path:
        """Refuse paths (symlinks included) that lead out of the repository."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ModelLoadError(f"{path} leads outside the model repository {self.root}")
        return resolved


def _version_folders(folder: Path) -> tuple[int, ...]:
    try:
        children = list(folder.iterdir())
    except OSError:
        return ()
    return tuple(
        sorted(
            int(child.name)
            for child in children
            if child.is_dir() and child.name.isdigit() and int(child.name) > 0
        )
    )


def _listed(versions: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in versions) or "none"
