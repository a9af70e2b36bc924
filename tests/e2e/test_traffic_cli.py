"""``inferd models split`` against a running server, and the split it sets at work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import run_cli


def test_split_from_the_command_line(start_server: Any, models_dir: Path, tmp_path: Path) -> None:
    iris = models_dir / "iris"
    shutil.copytree(iris / "1", iris / "2")
    toml = iris / "model.toml"
    toml.write_text(
        toml.read_text() + '\n[versions]\npolicy = "specific"\nversions = [1, 2]\ndefault = 1\n'
    )
    server = start_server(["--models-dir", str(models_dir)])
    server.wait_ready()
    url = ["--url", server.url]

    empty = run_cli("models", "split", "iris", *url, cwd=tmp_path)
    assert empty.returncode == 0, empty.stderr
    assert "no split" in empty.stdout
    made = run_cli(
        "models", "split", "iris", "1=0", "2=100", "--sticky-by", "header:X-User", *url,
        cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "100.0%" in made.stdout and "sticky by header:X-User" in made.stdout
    body = {"features": [5.1, 3.5, 1.4, 0.2]}
    answered = {httpx.post(server.url + "/predict", json=body).json()["model_version"]
                for _ in range(5)}  # fmt: skip
    assert answered == {"2"}
    shown = json.loads(run_cli("models", "split", "iris", "--json", *url, cwd=tmp_path).stdout)
    assert shown["split"]["weights"] == {"1": 0.0, "2": 100.0}
    bad = run_cli("models", "split", "iris", "1:95", *url, cwd=tmp_path)
    assert bad.returncode == 2 and "VERSION=WEIGHT" in bad.stderr
    unserved = run_cli("models", "split", "iris", "1=95", "3=5", *url, cwd=tmp_path)
    assert unserved.returncode == 2 and "does not serve version 3" in unserved.stderr
    cleared = run_cli("models", "split", "iris", "--clear", *url, cwd=tmp_path)
    assert cleared.returncode == 0 and "no split" in cleared.stdout
    assert httpx.post(server.url + "/predict", json=body).json()["model_version"] == "1"
