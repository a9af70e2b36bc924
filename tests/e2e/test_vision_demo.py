"""The digits demo as a person uses it: train it, serve it, upload pictures of digits."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from inferd.models.demo import VISION_DEMO, digit_picture
from tests.e2e.conftest import run_cli


@pytest.fixture(scope="module")
def digits_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models as `inferd models train-demo --vision` writes them."""
    root = tmp_path_factory.mktemp("vision-models")
    trained = run_cli("models", "train-demo", "--vision", "--models-dir", "models", cwd=root)
    assert trained.returncode == 0, trained.stderr
    assert re.search(r"digits v1: accuracy 0\.9\d\d", trained.stdout), trained.stdout
    return root / "models"


def _png(img: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def test_uploaded_digits_get_their_labels(digits_repo: Path, start_server: Any) -> None:
    server = start_server(["--models-dir", str(digits_repo)])
    server.wait_ready()
    x, y = load_digits(return_X_y=True)
    _, x_test, _, y_test = train_test_split(x, y, test_size=0.2, random_state=42, stratify=y)
    right = 0
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for i in range(30):
            # Dark ink on white at 64x64 like a drawing, every third one light on dark.
            img = digit_picture(x_test[i], scale=8, dark_on_light=i % 3 != 0)
            if i % 2:
                r = client.post(f"/v1/models/{VISION_DEMO}/classify", content=_png(img))
            else:
                r = client.post(
                    "/v1/predict", files={"file": ("digit.png", _png(img), "image/png")}
                )
            assert r.status_code == 200, r.text
            top = r.json()["predictions"][0]
            assert top["label"] == str(top["class_id"])
            right += top["label"] == str(y_test[i])
        assert right >= 25, f"{right} of 30 digits recognized"
        bad = client.post(f"/v1/models/{VISION_DEMO}/classify", content=b"GIF89a....")
        assert bad.status_code == 415
    assert server.stop() == 0
