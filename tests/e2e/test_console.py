"""The web console as a person uses it: Debian's Chromium, driven by Playwright, against a real
``inferd serve`` process.

No browser is downloaded: the tests use ``/usr/bin/chromium`` (``make chromium`` installs it).
Without it they skip, or fail when ``INFERD_TEST_REQUIRE_SERVICES=1``. Screenshots of each
step are written to ``test-artifacts/console/``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sklearn.datasets import load_iris

from tests.e2e.conftest import ROOT, Server, run_cli
from tests.support.images import write_brightness_model
from tests.support.models import write_streaming_model

# Both servers start in the first test's setup; on a loaded machine that alone can take 30 s.
pytestmark = pytest.mark.timeout(120)

CHROMIUM = Path(os.environ.get("INFERD_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "console"
IRIS_SETOSA = [5.1, 3.5, 1.4, 0.2]
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing; `make chromium` installs Debian's chromium"
        if os.environ.get("INFERD_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def servers(
    browser: Any, tmp_path_factory: pytest.TempPathFactory, demo_models: Path
) -> Iterator[dict[str, Any]]:
    """Both servers, started side by side (most of a start is imports and model loading):
    ``open`` (no auth; the demo models, iris in versions 1 and 2, a streaming model and an
    image model) and ``auth`` (keys required; iris only, with a key for alice in ``key``)."""
    root = tmp_path_factory.mktemp("console")
    (root / "open").mkdir()
    models = root / "open" / "models"
    shutil.copytree(demo_models, models)
    shutil.copytree(models / "iris" / "1", models / "iris" / "2")
    write_streaming_model(models, chunk_delay_s=0.5)
    write_brightness_model(models)
    opened = Server(["--models-dir", str(models)], root / "open")
    started = [opened]
    try:
        (root / "auth").mkdir()
        config = root / "auth" / "inferd.toml"
        config.write_text(
            f'models_dir = "{demo_models}"\nmodels = ["iris"]\nauth = "required"\n'
            "gc_freeze = false\n"
        )
        created = run_cli(
            "keys", "create", "--user", "alice", "--scopes", "predict,requests",
            "--config", str(config), cwd=root / "auth",
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        secured = Server(["--config", str(config)], root / "auth")
        started.append(secured)
        opened.wait_ready()
        secured.wait_ready()
        yield {"open": opened, "auth": secured, "key": created.stdout.strip()}
    finally:
        for server in started:
            server.stop(signal.SIGKILL)


class Console:
    """One browser tab on a server's console; uncaught page errors are collected."""

    def __init__(self, browser: Any, server: Server, name: str) -> None:
        from playwright.sync_api import expect

        self.expect = expect
        self.server = server
        self.name = name
        self.context = browser.new_context(viewport={"width": 1280, "height": 860})
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def open(self) -> None:
        self.page.goto(self.server.url + "/console")  # redirected to /console/

    def tab(self, name: str) -> None:
        self.page.click(f'.tabs a[data-tab="{name}"]')
        self.expect(self.page.locator(f"#view-{name}")).to_be_visible()

    def shot(self, step: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{self.name}-{step}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()
        assert self.errors == [], f"uncaught errors in the page: {self.errors}"


@pytest.fixture
def console(browser: Any) -> Iterator[Any]:
    opened: list[Console] = []

    def make(server: Server, name: str) -> Console:
        tab = Console(browser, server, name)
        opened.append(tab)
        return tab

    yield make
    for tab in opened:
        tab.close()


def _png(name: str, level: int) -> dict[str, Any]:
    """A 16x16 grey picture of the given level, as a PNG file for an upload field."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (16, 16), level).save(out, format="PNG")
    return {"name": name, "mimeType": "image/png", "buffer": out.getvalue()}


def _submit(server: Server, model: str, input: Any, headers: dict[str, str] | None = None) -> str:
    r = httpx.post(
        server.url + "/v1/requests",
        json={"model": model, "input": input},
        headers=headers or {},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_console_models_predict_stream_live_and_history(
    servers: dict[str, Any], console: Any
) -> None:
    server = servers["open"]
    tab = console(server, "open")
    page, expect = tab.page, tab.expect
    tab.open()
    assert page.url == server.url + "/console/"

    # Models: every model is listed as ready; without auth, admin actions are offered.
    for name in ("iris", "iris-forest", "streamer"):
        row = page.locator(f'#models-table tr[data-model="{name}"]')
        expect(row.locator(".badge.ready")).to_have_text("ready")
    iris = page.locator('#models-table tr[data-model="iris"]')
    expect(iris).to_contain_text("sklearn")
    expect(iris.locator('button[data-action="unload"]')).to_be_visible()
    expect(iris.locator('[data-field="serving"]')).to_have_text("v2")
    expect(page.locator("#identity")).to_have_text("authentication off")
    tab.shot("1-models")

    # Admin actions (offered while auth is off): roll iris back to v1; unload and load a model.
    iris.locator("select").select_option("1")
    iris.locator('button[data-action="default"]').click()
    expect(page.locator("#notice")).to_contain_text("iris: serve v1 done")
    expect(iris.locator('[data-field="serving"]')).to_have_text("v1")
    assert httpx.get(server.url + "/v1/models/iris").json()["default_version"] == "1"
    forest = page.locator('#models-table tr[data-model="iris-forest"]')
    forest.locator('button[data-action="unload"]').click()
    expect(forest.locator('[data-field="state"]')).to_have_text("unloaded")
    forest.locator('button[data-action="load"]').click()
    expect(forest.locator('[data-field="state"]')).to_have_text("ready")
    tab.shot("2-admin")

    # Playground: the example row is prefilled; a prediction shows its answer and latency.
    tab.tab("playground")
    page.select_option("#pg-model", "iris")
    expect(page.locator('#pg-features input[name="sepal_length_cm"]')).to_have_value("5.1")
    page.click("#pg-predict-btn")
    expect(page.locator("#pg-answer")).to_contain_text("setosa")
    expect(page.locator("#pg-latency")).to_contain_text(re.compile(r"Round trip [\d.]+ ms"))
    page.fill('#pg-features input[name="petal_length_cm"]', "6.0")
    page.fill('#pg-features input[name="petal_width_cm"]', "2.5")
    page.click("#pg-predict-btn")
    expect(page.locator("#pg-answer")).to_contain_text("virginica")
    tab.shot("3-predict")

    # An image model: upload a picture, see the top classes and the server's inference time.
    page.select_option("#pg-model", "brightness")
    expect(page.locator("#pg-image")).to_be_visible()
    expect(page.locator("#pg-tabular")).to_be_hidden()
    page.set_input_files("#pg-file", _png("white.png", 255))
    expect(page.locator("#pg-preview")).to_be_visible()
    page.click("#pg-classify-btn")
    expect(page.locator("#pg-answer")).to_contain_text("light")
    expect(page.locator("#pg-latency")).to_contain_text(re.compile(r"Inference [\d.]+ ms"))
    page.set_input_files("#pg-file", _png("black.png", 0))
    page.click("#pg-classify-btn")
    expect(page.locator("#pg-answer")).to_contain_text("dark")
    tab.shot("4-classify")

    # A long-running request streams in: its first response shows while it still runs.
    page.select_option("#pg-model", "streamer")
    page.fill("#pg-input", "hello")
    page.fill("#pg-params", '{"chunks": 4}')
    page.click("#pg-submit-btn")
    chunks = page.locator("#pg-stream-out .chunk")
    expect(chunks.first).to_have_text("hello-0")
    assert page.locator("#pg-stream-status").get_attribute("data-status") == "running"
    assert chunks.count() < 4
    tab.shot("5-streaming")
    expect(page.locator("#pg-stream-status")).to_have_attribute("data-status", "succeeded")
    expect(chunks).to_have_text(["hello-0", "hello-1", "hello-2", "hello-3"])
    streamed_id = page.locator("#pg-stream-id").inner_text()
    tab.shot("6-streamed")

    # Live view: the predictions above and these show up, and the figures keep refreshing;
    # a split between iris's versions is shown with the shares in force (all to v1 here, as
    # the drift view below counts v1's rows).
    split = {"weights": {"1": 100, "2": 0}}
    assert httpx.put(server.url + "/v1/admin/models/iris/split", json=split).status_code == 200
    for _ in range(20):
        r = httpx.post(server.url + "/predict", json={"features": IRIS_SETOSA}, timeout=10)
        assert r.status_code == 200
    tab.tab("live")
    total = page.locator('#live-table tr[data-model="iris"] [data-field="requests_total"]')
    expect(total).to_have_text("22")
    traffic = page.locator('#live-table tr[data-model="iris"] [data-field="traffic"]')
    expect(traffic).to_have_text("split v1 100%")
    expect(page.locator("#tile-rps")).to_have_text(re.compile(r"^(?!0\.0$)\d+(\.\d+)?$"))
    expect(page.locator("#tile-p99")).to_contain_text("ms")
    updated = page.locator("#live-window").inner_text()
    expect(page.locator("#live-window")).not_to_have_text(updated)
    tab.shot("7-live")

    # Drift view: the iris flowers sent as rows, then PSI per feature of the version serving.
    flowers = load_iris().data.tolist() * 2
    r = httpx.post(server.url + "/v1/models/iris/predict", json={"instances": flowers}, timeout=10)
    assert r.status_code == 200
    tab.tab("drift")
    page.select_option("#drift-model", "iris")
    card = page.locator('.drift-version[data-version="1"]')
    expect(card.locator('[data-field="rows"] .value')).to_have_text("322")
    expected = httpx.get(server.url + "/v1/models/iris/drift", timeout=5).json()
    (served,) = [v for v in expected["versions"] if v["version"] == "1"]
    assert served["status"] == "ok", served
    for feature in served["features"]:
        cell = card.locator(f'tr[data-feature="{feature["name"]}"] [data-field="psi"]')
        expect(cell).to_have_text(f"{feature['psi']:.3f}")
        assert feature["psi"] < 0.1
    expect(card.locator('[data-field="status"]')).to_have_text("ok")
    expect(card.locator('[data-part="classes"] tr[data-label="setosa"]')).to_contain_text("%")
    tab.shot("8-drift")

    # History: more requests than a page; page forward and back, open one's responses.
    submitted = [_submit(server, "iris", {"features": IRIS_SETOSA}) for _ in range(21)]
    tab.tab("history")
    page.select_option("#hist-limit", "10")
    rows = page.locator("#hist-table tbody tr")
    expect(page.locator("#hist-page")).to_have_text("Page 1")
    expect(rows).to_have_count(10)
    first_page = rows.evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert first_page == submitted[::-1][:10]  # newest first
    expect(page.locator("#hist-newer")).to_be_disabled()
    page.click("#hist-older")
    expect(page.locator("#hist-page")).to_have_text("Page 2")
    expect(rows.first).to_have_attribute("data-id", submitted[::-1][10])
    page.click("#hist-older")
    expect(page.locator("#hist-page")).to_have_text("Page 3")
    expect(rows).to_have_count(2)
    last_page = rows.evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert last_page == [submitted[0], streamed_id]
    expect(page.locator("#hist-older")).to_be_disabled()
    page.click(f'#hist-table tr[data-id="{streamed_id}"]')
    responses = page.locator("#hist-responses li pre")
    expect(responses).to_have_text(["hello-0", "hello-1", "hello-2", "hello-3"])
    expect(page.locator("#hist-detail .badge")).to_have_text("succeeded")
    tab.shot("9-history")
    page.click("#hist-newer")
    expect(page.locator("#hist-page")).to_have_text("Page 2")
    expect(rows.first).to_have_attribute("data-id", submitted[::-1][10])


def test_console_with_auth_asks_for_a_key_and_keeps_it_in_the_session(
    servers: dict[str, Any], console: Any
) -> None:
    server, key = servers["auth"], servers["key"]

    # The page is public, kept to its own origin and revalidated; the API behind it is not.
    script = httpx.get(server.url + "/console/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "script-src 'self'" in script.headers["content-security-policy"]
    again = httpx.get(
        server.url + "/console/app.js", headers={"If-None-Match": script.headers["etag"]}
    )
    assert again.status_code == 304
    missing = httpx.get(server.url + "/console/nope.js")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/v1/stats").status_code == 401
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(server.url + "/v1/stats", headers=auth).status_code == 200

    tab = console(server, "auth")
    page, expect = tab.page, tab.expect
    tab.open()
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    page.fill("#key-input", "inferd_000000000000_wrong")
    page.click("#key-submit")
    expect(page.locator("#key-error")).to_contain_text("not accepted")
    tab.shot("1-key-prompt")
    page.fill("#key-input", key)
    page.click("#key-submit")
    expect(dialog).to_be_hidden()
    expect(page.locator("#identity")).to_have_text("alice · predict, requests")
    expect(page.locator('#models-table tr[data-model="iris"] .badge.ready')).to_have_text("ready")
    expect(page.locator('#models-table th:has-text("Actions")')).to_be_hidden()  # not admin
    tab.shot("2-signed-in")

    # The key lives in this tab's session storage only.
    assert page.evaluate("sessionStorage.getItem('inferd.console.key')") == key
    assert page.evaluate("localStorage.length") == 0
    assert page.evaluate("document.cookie") == ""

    tab.tab("playground")
    page.select_option("#pg-model", "iris")
    page.click("#pg-predict-btn")
    expect(page.locator("#pg-answer")).to_contain_text("setosa")
    mine = _submit(server, "iris", {"features": IRIS_SETOSA}, auth)
    tab.tab("history")
    expect(page.locator("#hist-table tbody tr")).to_have_count(1)
    expect(page.locator("#hist-table tbody tr").first).to_have_attribute("data-id", mine)

    # A reload keeps the session; forgetting the key asks again.
    page.reload()
    expect(page.locator("#identity")).to_have_text("alice · predict, requests")
    expect(dialog).to_be_hidden()
    page.click("#forget-key")
    expect(dialog).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
