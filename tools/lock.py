"""The dependency locks: refresh them from pyproject.toml, or check that they still match it.

``requirements/run.txt`` is what ``make run`` and the container image install (inferd with its
``postgres``, ``redis`` and ``s3`` extras), resolved for every platform. ``requirements/dev.txt``
is what ``make test`` installs (the ``dev`` extra: test tools, linters, torch), resolved for the
CPython 3.11 / Linux x86_64 machines that run the suite. Both pin every package, transitive ones
included, with hashes, and both pin the build tools of the editable install.

    python tools/lock.py refresh    # what `make lock` runs (needs uv, from the dev lock)
    python tools/lock.py refresh --upgrade  # `make lock UPGRADE=1`: newest releases too
    python tools/lock.py check      # what `make lint` runs: fails when pyproject.toml moved on

Each lock starts with a digest of the declarations it was resolved from (dependencies, extras,
requires-python, build requirements), so any change to them without a refresh is caught, and
every direct requirement is checked against the version pinned for it. A refresh keeps the
versions a lock pins where pyproject.toml still allows them (uv prefers the pins of an existing
output file), so adding one dependency changes only what it brings; ``--upgrade`` resolves every
package to its newest release.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DIGEST_PREFIX = "# inferd-lock-input: sha256="
REFRESH_HINT = "run `make lock` and commit requirements/"


@dataclass(frozen=True)
class Lock:
    """One lock file and what it is resolved from."""

    path: str
    extras: tuple[str, ...]
    universal: bool


LOCKS = (
    Lock("requirements/run.txt", ("postgres", "redis", "s3"), universal=True),
    Lock("requirements/dev.txt", ("dev", "postgres", "redis", "s3"), universal=False),
)
# Installed from the locks too: `pip install --no-build-isolation -e .` builds with them.
BUILD_INPUT = "requirements/build.in"
# Where the test machines keep the CPU build of torch that PyPI does not have.
LOCAL_WHEELS = Path("/opt/wheels")


class LockError(Exception):
    """A lock that does not match pyproject.toml; the message says what and how to fix it."""


def _pyproject(root: Path) -> dict[str, object]:
    with (root / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def input_digest(root: Path, lock: Lock) -> str:
    """The digest of everything in pyproject.toml that ``lock`` was resolved from."""
    data = _pyproject(root)
    project = data["project"]
    assert isinstance(project, dict)
    optional = project.get("optional-dependencies", {})
    build = data.get("build-system", {})
    assert isinstance(optional, dict)
    assert isinstance(build, dict)
    wanted = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "extras": {name: optional.get(name) for name in lock.extras},
        "build": build.get("requires", []),
        "build.in": (root / BUILD_INPUT).read_text(),
        "universal": lock.universal,
    }
    blob = json.dumps(wanted, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def pins(text: str) -> dict[str, Version]:
    """Package name → pinned version of a lock (the first pin of a name wins)."""
    found: dict[str, Version] = {}
    for line in text.splitlines():
        match = _PIN.match(line)
        if match:
            found.setdefault(canonicalize_name(match[1]), Version(match[2]))
    return found


def direct_requirements(root: Path, lock: Lock) -> list[Requirement]:
    """The requirements pyproject.toml states for ``lock`` (base plus its extras)."""
    project = _pyproject(root)["project"]
    assert isinstance(project, dict)
    lines = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in lock.extras:
        lines += optional.get(extra, [])
    return [Requirement(line) for line in lines if not line.startswith("inferd")]


def check(root: Path = ROOT) -> None:
    """Raise `LockError` unless every lock matches pyproject.toml."""
    problems: list[str] = []
    for lock in LOCKS:
        path = root / lock.path
        if not path.exists():
            problems.append(f"{lock.path} is missing")
            continue
        text = path.read_text()
        recorded = next(
            (
                line[len(DIGEST_PREFIX) :].strip()
                for line in text.splitlines()
                if line.startswith(DIGEST_PREFIX)
            ),
            None,
        )
        if recorded != input_digest(root, lock):
            problems.append(
                f"{lock.path} was resolved from other dependency declarations than "
                "pyproject.toml has now"
            )
        pinned = pins(text)
        for req in direct_requirements(root, lock):
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            version = pinned.get(canonicalize_name(req.name))
            if version is None:
                problems.append(f"{lock.path} pins no version of {req.name} ({req})")
            elif not req.specifier.contains(version, prereleases=True):
                problems.append(f"{lock.path} pins {req.name}=={version}, outside {req}")
    if problems:
        raise LockError(
            "the dependency locks do not match pyproject.toml:\n  - "
            + "\n  - ".join(problems)
            + f"\n{REFRESH_HINT}"
        )


def refresh(root: Path = ROOT, upgrade: bool = False) -> None:
    """Resolve every lock again with uv and stamp it with the digest of its input; the
    versions pinned now are kept where still allowed, unless ``upgrade``."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise LockError("uv is not installed: `make lock` installs it from requirements/dev.txt")
    for lock in LOCKS:
        command = [
            uv,
            "pip",
            "compile",
            "--quiet",
            "--generate-hashes",
            "--no-header",
            "--python-version",
            "3.11",
            "pyproject.toml",
            BUILD_INPUT,
        ]
        for extra in lock.extras:
            command += ["--extra", extra]
        if LOCAL_WHEELS.is_dir():  # the CPU build of torch the test machines keep
            command += ["--find-links", str(LOCAL_WHEELS)]
        if lock.universal:
            command.append("--universal")
        else:
            command += ["--python-platform", "x86_64-manylinux_2_28"]
        if upgrade:
            command.append("--upgrade")
        with tempfile.TemporaryDirectory() as scratch:
            # uv prefers the versions pinned in an existing output file.
            output = Path(scratch) / "lock.txt"
            current = root / lock.path
            if current.is_file():
                output.write_text(current.read_text())
            command += ["--output-file", str(output)]
            subprocess.run(command, cwd=root, check=True, capture_output=True, text=True)
            resolved = output.read_text()
        header = (
            "# Generated by `make lock` (tools/lock.py) from pyproject.toml; do not edit.\n"
            f"# Extras: {', '.join(lock.extras)}. "
            + (
                "Every platform, CPython >= 3.11.\n"
                if lock.universal
                else "CPython 3.11 on Linux x86_64 (torch: the CPU build).\n"
            )
            + f"{DIGEST_PREFIX}{input_digest(root, lock)}\n"
        )
        (root / lock.path).write_text(header + resolved)
        print(f"wrote {lock.path}: {len(pins(resolved))} packages")


def main(argv: list[str]) -> int:
    if argv[1:] == ["check"]:
        try:
            check()
        except LockError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if argv[1:] in (["refresh"], ["refresh", "--upgrade"]):
        refresh(upgrade="--upgrade" in argv)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
