"""deploy/Dockerfile and the root .dockerignore, without a Docker engine.

The Dockerfile is parsed (dockerfile-parse) and its stages checked; the wheel it builds is
built here from exactly what its COPY instructions take from the build context (minus what
.dockerignore excludes), and compared with the package the tests import. What runs inside the
image at run time is exercised by test_stack.py (the HEALTHCHECK command, the read-only file
system contract); building the image itself needs an engine and is not done here.
"""

from __future__ import annotations

import email.parser
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser
from tools.lock import LOCKS

import inferd
from tests.deploy.conftest import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


# ----------------------------------------------------------------------------- parsing
def instructions() -> list[dict[str, Any]]:
    parsed = DockerfileParser(path=str(DOCKERFILE))
    return [i for i in parsed.structure if i["instruction"] != "COMMENT"]


def stages() -> list[list[dict[str, Any]]]:
    """The instructions of each stage, FROM first."""
    result: list[list[dict[str, Any]]] = []
    for instruction in instructions():
        if instruction["instruction"] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def values(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def env_of(stage: list[dict[str, Any]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in values(stage, "ENV"):
        for pair in shlex.split(value):
            key, _, val = pair.partition("=")
            env[key] = val
    return env


def build_args(stage: list[dict[str, Any]]) -> dict[str, str]:
    return dict(v.partition("=")[::2] for v in values(stage, "ARG"))


def exec_form(value: str) -> list[str]:
    result = json.loads(value)
    assert isinstance(result, list), f"{value!r} is not in exec form"
    return [str(part) for part in result]


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK of the final stage, as the argv Docker runs."""
    (value,) = values(stages()[-1], "HEALTHCHECK")
    options, _, command = value.partition("CMD")
    assert options.strip().startswith("--interval"), value
    return exec_form(command.strip())


# ----------------------------------------------------------------------------- .dockerignore
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        rules.append((keep, _pattern_regex(line.lstrip("!").strip("/"))))
    return rules


def ignored(relative: str) -> bool:
    """Whether Docker leaves ``relative`` (a path in the context) out: the last rule that
    matches the path or one of its parents decides."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for keep, regex in ignore_rules():
        if any(regex.match(prefix) for prefix in prefixes):
            verdict = not keep
    return verdict


def copy_sources(stage: list[dict[str, Any]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context."""
    copies = []
    for value in values(stage, "COPY"):
        words = value.split()
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


def build_context_copy(target: Path) -> Path:
    """The files the builder stage copies from the context, laid out as in its WORKDIR."""
    for sources, destination in copy_sources(stages()[0]):
        for source in sources:
            src = ROOT / source
            into_folder = destination.endswith("/") or len(sources) > 1
            dest = target / destination / src.name if into_folder else target / destination
            files = [p for p in src.rglob("*") if p.is_file()] if src.is_dir() else [src]
            for path in files:
                if ignored(path.relative_to(ROOT).as_posix()):
                    continue
                out = dest / path.relative_to(src) if src.is_dir() else dest
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
    return target


# ----------------------------------------------------------------------------- tests
def test_the_image_is_multi_stage_on_python_311_slim() -> None:
    parsed = DockerfileParser(path=str(DOCKERFILE))
    assert parsed.is_multistage
    assert len(stages()) >= 2
    assert parsed.parent_images[-1] == "python:3.11-slim"
    # the venv is copied between stages: both must have the same Python at the same path
    assert set(parsed.parent_images) == {"python:3.11-slim"}


def test_the_builder_makes_the_wheel_and_the_demo_models() -> None:
    builder = stages()[0]
    runs = " ".join(values(builder, "RUN"))
    assert re.search(r"pip wheel .*\.\[\$\{EXTRAS\}\]", runs)
    assert "inferd models train-demo --models-dir /models" in runs
    assert "--no-index" in runs, "the venv is installed from the built wheels only"
    assert "--require-hashes --no-deps --wheel-dir /wheels -r requirements/run.txt" in runs
    extras = build_args(builder)["EXTRAS"].split(",")
    (run_lock,) = (lock for lock in LOCKS if lock.path == "requirements/run.txt")
    assert set(extras) == set(run_lock.extras), "the default image is the run lock"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(extras) == {"postgres", "redis", "s3"}, "slim by default: no torch"
    assert set(extras) | {"text"} <= set(project["optional-dependencies"])


def test_the_runtime_runs_as_a_numeric_non_root_user() -> None:
    final = stages()[-1]
    (user,) = values(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) == 10001
    assert not gid or (gid.isdigit() and int(gid) != 0)
    runs = " ".join(values(final, "RUN"))
    assert "--uid 10001" in runs
    # nothing runs after USER that could need root, and USER comes before the entrypoint
    order = [i["instruction"] for i in final]
    assert order.index("USER") > max(i for i, name in enumerate(order) if name == "RUN")
    assert order.index("USER") < order.index("ENTRYPOINT")


def test_the_runtime_entrypoint_serves_or_works() -> None:
    final = stages()[-1]
    (entrypoint,) = values(final, "ENTRYPOINT")
    (cmd,) = values(final, "CMD")
    assert exec_form(entrypoint) == ["inferd"]
    assert exec_form(cmd) == ["serve", "--host", "0.0.0.0"]
    env = env_of(final)
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert "--from=builder /opt/venv /opt/venv" in values(final, "COPY")


def test_the_runtime_writes_only_to_volumes() -> None:
    final = stages()[-1]
    env = env_of(final)
    assert env["INFERD_DATA_DIR"] == "/data"
    assert env["INFERD_MODELS_DIR"] == "/models"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert exec_form(values(final, "VOLUME")[0]) == [env["INFERD_DATA_DIR"]]
    assert "--from=builder /models /models" in values(final, "COPY")
    assert values(final, "WORKDIR")[-1] != env["INFERD_DATA_DIR"]


def test_the_healthcheck_probes_liveness_with_python() -> None:
    command = healthcheck_command()
    assert command[0] == "python"
    assert "/health/live" in command[-1]
    assert not {"curl", "wget"} & set(command)


def test_dockerignore_keeps_the_sources_and_drops_the_rest() -> None:
    for sources, _ in copy_sources(stages()[0]):
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not ignored(source), f"{source} is copied but .dockerignore excludes it"
    assert not ignored("src/inferd/db/migrations/env.py")
    assert not ignored("src/inferd/db/migrations/versions/0001_initial.py")
    for junk in (
        ".venv/bin/python",
        ".git/HEAD",
        "models/iris/1/model.joblib",
        "src/inferd/__pycache__/cli.cpython-311.pyc",
        "src/inferd.egg-info/PKG-INFO",
        ".env",
        "tests/conftest.py",
    ):
        assert ignored(junk), junk


def test_the_wheel_the_image_builds_is_this_project(tmp_path: Path) -> None:
    """pip wheel over exactly the files the builder stage copies, as the image does (here with
    the installed setuptools instead of an isolated build environment: no network)."""
    context = build_context_copy(tmp_path / "context")
    assert (context / "pyproject.toml").is_file() and (context / "src" / "inferd").is_dir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "wheels"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("inferd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(info).decode())
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "inferd/db/migrations/env.py" in names
    assert "inferd/db/migrations/script.py.mako" in names
    assert "inferd/py.typed" in names
    package = Path(inferd.__file__).parent
    for migration in (package / "db" / "migrations" / "versions").glob("*.py"):
        assert f"inferd/db/migrations/versions/{migration.name}" in names, migration.name
    modules = {p.relative_to(package.parent).as_posix() for p in package.rglob("*.py")}
    assert modules <= names, f"missing from the wheel: {modules - names}"
    assert metadata["Name"] == "inferd"
    assert metadata["Version"] == inferd.__version__
    assert {"postgres", "redis", "text"} <= set(metadata.get_all("Provides-Extra") or [])
    assert re.search(r"^inferd = inferd\.cli:main$", entry_points, re.M)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("src/x/__pycache__/a.pyc", True),
        ("deploy/Dockerfile", True),
        ("src/inferd/cli.py", False),
        ("README.md", False),
    ],
)
def test_the_dockerignore_matcher(path: str, expected: bool) -> None:
    assert ignored(path) is expected
