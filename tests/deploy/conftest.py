"""Checks of the deployment artifacts under deploy/ (image, compose, Kubernetes, monitoring).

Tools that come from outside PyPI (``promtool`` and ``prometheus`` from Debian's
``prometheus`` package, ``kubectl`` or ``kustomize``) are looked up on PATH: a test that needs
a missing one is skipped with the command that installs it, unless
``INFERD_TEST_REQUIRE_SERVICES=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from inferd.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
REQUIRE_SERVICES = os.environ.get("INFERD_TEST_REQUIRE_SERVICES") == "1"

_INSTALL = {
    "promtool": "apt-get install -y --no-install-recommends prometheus",
    "prometheus": "apt-get install -y --no-install-recommends prometheus",
}


def need_tool(*names: str) -> str:
    """The path of the first of ``names`` on PATH; skip (or fail in CI) when none is there."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    how = _INSTALL.get(names[0])
    message = f"{' or '.join(names)} is not installed" + (f": {how} (as root)" if how else "")
    if REQUIRE_SERVICES:
        pytest.fail(message)
    pytest.skip(message)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- metric names
def exported_metric_names() -> set[str]:
    """Every sample name an inferd process can export (the families of :class:`Metrics`)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
# Prefixes of inferd's own metric names and of the process collector's; label names (model,
# version, status, le...) never start with one of these.
_METRIC = re.compile(r"\b(?:inference|model|prediction|process|python)_[a-zA-Z0-9_]+\b")


def referenced_metrics(expr: str) -> set[str]:
    """Names in a PromQL expression that look like inferd or process metrics."""
    return set(_METRIC.findall(_STRINGS.sub('""', expr)))


def assert_known_metrics(exprs: Iterable[str], where: str) -> None:
    known = exported_metric_names()
    for expr in exprs:
        unknown = referenced_metrics(expr) - known
        assert not unknown, f"{where}: {expr!r} uses metrics inferd does not export: {unknown}"


# ----------------------------------------------------------------------------- Prometheus
class Prometheus:
    """A real Prometheus server on a loopback port, with the given configuration."""

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited early:\n{self.output()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"prometheus not ready in {timeout}s:\n{self.output()}")

    def query(self, expr: str) -> httpx.Response:
        return httpx.post(self.url + "/api/v1/query", data={"query": expr}, timeout=10)

    def vector(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate ``expr`` now; assert it parsed and gave an instant vector."""
        response = self.query(expr)
        assert response.status_code == 200, f"{expr!r}: {response.status_code} {response.text}"
        data = response.json()["data"]
        assert data["resultType"] == "vector", f"{expr!r} gave a {data['resultType']}"
        result: list[dict[str, Any]] = data["result"]
        return result

    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=10)
        response.raise_for_status()
        return response.json()["data"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return need_tool("prometheus")


@pytest.fixture(scope="session")
def bare_prometheus(
    prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """A Prometheus with no targets: it parses and evaluates any expression (on no data)."""
    server = Prometheus(
        prometheus_binary,
        tmp_path_factory.mktemp("bare-prometheus"),
        {"global": {"scrape_interval": "15s"}},
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
