"""The model repository: a folder of ``<name>/model.toml`` and ``<name>/<version>/<artifact>``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from inferd.errors import ConfigError, ModelLoadError, ModelNotFound
from inferd.models.spec import ModelSpec, load_spec

__all__ = ["ModelEntry", "ModelRepository"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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

    def artifact(self, version: int) -> Path:
        name = self.spec.artifact_name
        folder = self.folder / str(version)
        return folder / name if name is not None else folder


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

    def get(self, name: str) -> ModelEntry:
        """The model ``name`` with its versions; raises if it is missing or has no version."""
        if not _NAME.match(name):
            raise ModelNotFound(f"{name!r} is not a valid model name")
        folder = self._inside(self.root / name)
        if not (folder / "model.toml").is_file():
            raise ModelNotFound(f"model {name!r} is not in the repository {str(self.root)!r}")
        spec = load_spec(folder / "model.toml", name)
        versions = sorted(
            int(child.name)
            for child in folder.iterdir()
            if child.is_dir() and child.name.isdigit() and int(child.name) > 0
        )
        if not versions:
            raise ModelLoadError(
                f"model {name!r}: no version folder in {folder} "
                f"(expected {folder}/1/{spec.artifact_name or ''})"
            )
        entry = ModelEntry(spec=spec, folder=folder, versions=tuple(versions))
        path = self._inside(entry.artifact(entry.latest))
        if not path.exists():
            raise ModelLoadError(f"model {name!r} version {entry.latest}: {path} is missing")
        return entry

    def entries(self, names: list[str] | None = None) -> list[ModelEntry]:
        """Entries for ``names`` (every model when None); raises on the first bad one."""
        wanted = names if names is not None else self.names()
        return [self.get(name) for name in wanted]

    def _inside(self, path: Path) -> Path:
        """Refuse paths (symlinks included) that lead out of the repository."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ModelLoadError(f"{path} leads outside the model repository {self.root}")
        return resolved
