"""The command line and the server process, used as the README says."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import run_cli


def test_train_demo_then_list(tmp_path: Path) -> None:
    trained = run_cli("models", "train-demo", "--models-dir", "models", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "iris v1" in trained.stdout
    assert (tmp_path / "models" / "iris" / "1" / "model.joblib").is_file()
    assert (tmp_path / "models" / "iris-forest" / "model.toml").is_file()
    reference = json.loads((tmp_path / "models" / "iris" / "1" / "reference.json").read_text())
    assert reference["rows"] == 120 and reference["predictions"]["kind"] == "classes"
    again = run_cli("models", "train-demo", "--models-dir", "models", cwd=tmp_path)
    assert again.returncode == 0
    assert "already" in again.stdout
    listed = run_cli("models", "list", "--models-dir", "models", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["iris", "iris-forest"]
    assert rows[0]["served_version"] == 1
    table = run_cli("models", "list", "--models-dir", "models", cwd=tmp_path)
    assert "iris-forest" in table.stdout


def test_serve_answers_over_http_and_stops_cleanly(start_server: Any, models_dir: Path) -> None:
    server = start_server(["--models-dir", str(models_dir)])
    server.wait_ready()
    r = httpx.post(
        server.url + "/predict",
        json={"features": [5.1, 3.5, 1.4, 0.2], "request_id": "test-001"},
    )
    assert r.status_code == 200
    assert r.json()["request_id"] == "test-001"
    assert r.json()["prediction"] == 0
    metrics = httpx.get(server.url + "/metrics").text
    assert "inference_request_latency_seconds_bucket" in metrics
    assert httpx.get(server.url + "/docs").status_code == 200
    assert server.stop(signal.SIGTERM) == 0
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("event") == "request"]
    assert any(line["request_id"] == "test-001" and line["status_code"] == 200 for line in access)
    assert all({"timestamp", "level"} <= set(line) for line in lines)


def test_config_file_and_env(start_server: Any, models_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "inferd.toml"
    config.write_text(f'models_dir = "{models_dir}"\ndefault_model = "iris-forest"\n')
    server = start_server(["--config", str(config)])
    server.wait_ready()
    listing = httpx.get(server.url + "/v1/models").json()
    assert listing["default"] == "iris-forest"


def test_missing_repository_fails_fast(tmp_path: Path) -> None:
    result = run_cli("serve", "--models-dir", "nowhere", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "nowhere" in result.stderr
    assert "train-demo" in result.stderr


def test_missing_artifact_fails_fast(tmp_path: Path, models_dir: Path) -> None:
    (models_dir / "iris" / "1" / "model.joblib").unlink()
    result = run_cli("serve", "--models-dir", str(models_dir), "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "iris/1/model.joblib" in result.stderr
    assert "missing" in result.stderr


def test_corrupt_artifact_fails_start_up(start_server: Any, models_dir: Path) -> None:
    (models_dir / "iris" / "1" / "model.joblib").write_bytes(b"\x80\x04garbage")
    server = start_server(["--models-dir", str(models_dir)])
    code = server.proc.wait(60)
    output = server.output()
    assert code == 1
    assert "iris/1/model.joblib" in output
    assert "corrupt" in output


def test_bad_setting_is_reported(tmp_path: Path) -> None:
    result = run_cli("serve", "--port", "99999", cwd=tmp_path)
    assert result.returncode == 2
    assert "port" in result.stderr


def test_keys_from_the_command_line(start_server: Any, models_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "inferd.toml"
    config.write_text(f'models_dir = "{models_dir}"\nauth = "required"\nkey_cache_seconds = 0\n')
    created = run_cli(
        "keys", "create", "--user", "erin", "--scopes", "predict", "--config", str(config),
        cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("inferd_")
    assert "shown only now" in created.stderr
    bad = run_cli("keys", "create", "--user", "x", "--scopes", "root", "--config", str(config),
                  cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2
    assert "unknown: root" in bad.stderr
    ops = run_cli("keys", "create", "--user", "ops", "--scopes", "predict", "--priority", "high",
                  "--config", str(config), cwd=tmp_path)  # fmt: skip
    assert ops.returncode == 0, ops.stderr
    odd = run_cli("keys", "create", "--user", "x", "--priority", "urgent", "--config", str(config),
                  cwd=tmp_path)  # fmt: skip
    assert odd.returncode == 2
    assert "priority must be one of high, normal, low" in odd.stderr
    listed = json.loads(
        run_cli("keys", "list", "--json", "--config", str(config), cwd=tmp_path).stdout
    )
    assert [(k["user"], k["scopes"], k["priority"], k["revoked"]) for k in listed] == [
        ("erin", ["predict"], "normal", False),
        ("ops", ["predict"], "high", False),
    ]
    assert key not in json.dumps(listed)

    server = start_server(["--config", str(config)])
    server.wait_ready()
    body = {"features": [5.1, 3.5, 1.4, 0.2]}
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.post(server.url + "/predict", json=body).status_code == 401
    assert httpx.post(server.url + "/predict", json=body, headers=auth).status_code == 200
    revoked = run_cli("keys", "revoke", listed[0]["id"], "--config", str(config), cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    assert httpx.post(server.url + "/predict", json=body, headers=auth).status_code == 401
    assert key not in server.output()


def test_profile_writes_the_reference_a_server_loads(
    start_server: Any, models_dir: Path, tmp_path: Path
) -> None:
    from sklearn.datasets import load_iris

    iris = load_iris()
    names = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]
    lines = [",".join(["species", *reversed(names)])]  # any order; extra columns are not read
    for row, target in zip(iris.data, iris.target, strict=True):
        lines.append(",".join([str(iris.target_names[target]), *map(str, reversed(row))]))
    data = tmp_path / "iris.csv"
    data.write_text("\n".join(lines) + "\n")
    args = ("models", "profile", str(data), "--model", "iris", "--models-dir", str(models_dir))

    kept = run_cli(*args, cwd=tmp_path)
    assert kept.returncode == 2
    assert "reference.json exists; use --force to replace it" in kept.stderr
    written = run_cli(*args, "--force", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    assert "columns not used: species" in written.stderr
    assert "setosa 33.3%" in written.stdout and "wrote" in written.stdout
    reference = json.loads((models_dir / "iris" / "1" / "reference.json").read_text())
    assert reference["rows"] == 150 and reference["source"] == "iris.csv"
    assert list(reference["features"]) == names
    assert reference["predictions"]["counts"][0] == 50  # every setosa recognised

    short = tmp_path / "short.csv"
    short.write_text("sepal_length_cm,petal_length_cm\n5.1,1.4\n")
    refused = run_cli("models", "profile", str(short), "--model", "iris", "--models-dir",
                      str(models_dir), "-o", str(tmp_path / "x.json"), cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2
    assert "the header has no column sepal_width_cm, petal_width_cm" in refused.stderr
    plain = run_cli("models", "profile", str(short), "--categorical", "petal_length_cm",
                    "-o", "plain.json", cwd=tmp_path)  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    alone = json.loads((tmp_path / "plain.json").read_text())
    assert alone["features"]["petal_length_cm"]["kind"] == "categorical"
    assert "predictions" not in alone

    server = start_server(["--models-dir", str(models_dir)])
    server.wait_ready()
    drift = httpx.get(server.url + "/v1/models/iris", timeout=5).json()["drift"]
    assert drift["reference"] is True
    assert drift["detail"] == "reference.json: 150 rows, 4 features, predictions"
