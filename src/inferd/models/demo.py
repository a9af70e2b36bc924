"""The demo models, trained from the iris data that scikit-learn ships (no download)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_MODELS",
    "VISION_DEMO",
    "DemoResult",
    "digit_picture",
    "train_demo",
    "train_vision_demo",
]

_FEATURES = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]
_LABELS = ["setosa", "versicolor", "virginica"]

_TOML = """\
# {title}
runtime = "sklearn"
task = "classification"
description = "{description}"
artifact = "model.joblib"

[input]
features = {features}
example = [5.1, 3.5, 1.4, 0.2]

[output]
labels = {labels}

[batching]
max_batch_size = 32
batch_window_ms = 5.0
max_queue_size = 2000
"""


@dataclass(frozen=True)
class DemoResult:
    name: str
    version: int
    accuracy: float
    path: Path


def _logistic() -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000)


def _forest() -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=50, max_depth=6, random_state=42)


DEMO_MODELS: dict[str, tuple[str, Callable[[], Any]]] = {
    "iris": ("Logistic regression on the iris flowers.", _logistic),
    "iris-forest": ("Random forest on the iris flowers.", _forest),
}


def _quoted(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def train_demo(
    models_dir: Path,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[DemoResult]:
    """Train and write every demo model that is missing (all of them with ``force``), each
    with the reference profile of its training data (``reference.json``, for drift)."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    x, y = load_iris(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=42, stratify=y
    )
    results = []
    for name, (description, make) in DEMO_MODELS.items():
        folder = models_dir / name
        artifact = folder / "1" / "model.joblib"
        if artifact.is_file() and (folder / "model.toml").is_file() and not force:
            written = _write_reference(joblib.load(artifact), x_train, artifact.parent, False)
            if progress:
                added = ", reference profile added" if written else ""
                progress(f"{name}: already present{added}")
            continue
        if progress:
            progress(f"{name}: training")
        estimator = make()
        estimator.fit(x_train, y_train)
        accuracy = float(estimator.score(x_test, y_test))
        artifact.parent.mkdir(parents=True, exist_ok=True)
        tmp = artifact.with_suffix(".tmp")
        joblib.dump(estimator, tmp)
        tmp.replace(artifact)
        _write_reference(estimator, x_train, artifact.parent, True)
        (folder / "model.toml").write_text(
            _TOML.format(
                title=f"inferd demo model {name}",
                description=description,
                features=_quoted(_FEATURES),
                labels=_quoted(_LABELS),
            ),
            encoding="utf-8",
        )
        results.append(DemoResult(name, 1, accuracy, artifact))
        if progress:
            progress(f"{name}: written (test accuracy {accuracy:.3f})")
    return results


def _write_reference(estimator: Any, x_train: Any, folder: Path, replace: bool) -> bool:
    """Write ``folder/reference.json``: the training rows' profile and the model's predictions
    on them (unless there is one already and not ``replace``). Returns whether it wrote."""
    from inferd.monitoring import REFERENCE_FILE, build_reference

    target = folder / REFERENCE_FILE
    if target.is_file() and not replace:
        return False
    reference = build_reference(
        x_train,
        _FEATURES,
        outputs=estimator.predict_proba(x_train),
        labels=_LABELS,
        source=f"iris training split ({len(x_train)} rows)",
    )
    tmp = target.with_suffix(".tmp")
    tmp.write_text(reference.dump(), encoding="utf-8")
    tmp.replace(target)
    return True


# --------------------------------------------------------------------------- the image demo

VISION_DEMO = "digits"
"""The demo image model: a small ResNet that reads handwritten digits."""

DIGIT_SIZE = 16
"""Side of the square the digits model sees: the 8x8 digits, upscaled."""

_VISION_TOML = """\
# inferd demo model {name}: a small ResNet trained on scikit-learn's 8x8 handwritten digits.
# Upload a picture of one digit (dark on light or light on dark) to
# POST /v1/models/{name}/classify and get "0" to "9" back.
runtime = "torch"
task = "classification"
description = "Handwritten digits (0-9): a small ResNet trained on scikit-learn's digits."
architecture = "resnet-small"
weights = "{weights}"

[input]
type = "image"

[image]
size = {size}
channels = "L"
mean = [0.5]
std = [0.5]
max_bytes = 2097152
max_pixels = 4000000

[output]
labels = {labels}

[batching]
max_batch_size = 32
batch_window_ms = 2.0
"""

_VISION_WEIGHTS = "resnet-small-digits.pth"


def digit_picture(pixels: Any, scale: int = 8, dark_on_light: bool = True) -> Any:
    """One 8x8 scikit-learn digit (values 0-16) as a grayscale PIL picture ``scale`` times
    larger, drawn as a person would: dark ink on white by default."""
    import numpy as np
    from PIL import Image

    ink = np.clip(np.asarray(pixels, dtype=np.float64).reshape(8, 8) / 16.0, 0.0, 1.0)
    values = (1.0 - ink) if dark_on_light else ink
    img = Image.fromarray(np.round(values * 255).astype(np.uint8), mode="L")
    return img.resize((8 * scale, 8 * scale), Image.Resampling.NEAREST) if scale > 1 else img


def _digit_inputs(x: Any, variants: list[tuple[int, bool]]) -> Any:
    """The digits as the served model will see them: row ``i`` drawn as ``variants[i]`` says
    (scale, dark on light), then prepared by the same code that prepares uploads."""
    import numpy as np

    from inferd.models.images import Preprocessor
    from inferd.models.spec import ImageSpec

    pre = Preprocessor(ImageSpec(size=DIGIT_SIZE, channels="L", mean=[0.5], std=[0.5]))
    rows = [
        pre.from_picture(digit_picture(row, scale, dark))[0]
        for row, (scale, dark) in zip(x, variants, strict=True)
    ]
    return np.stack(rows)


def train_vision_demo(
    models_dir: Path,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    epochs: int = 6,
    seed: int = 0,
) -> DemoResult | None:
    """Train the digits model into ``models_dir/digits`` (None when present and not ``force``).

    A ResNet with one basic block per stage and 8 to 64 channels, on 16x16 pictures: a few
    seconds on two CPU cores. The accuracy is measured on the held-out fifth of the digits,
    drawn dark on light and light on dark.
    """
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from inferd.models.resnet import build

    folder = models_dir / VISION_DEMO
    weights = folder / "1" / _VISION_WEIGHTS
    if weights.is_file() and (folder / "model.toml").is_file() and not force:
        if progress:
            progress(f"{VISION_DEMO}: already present")
        return None
    if progress:
        progress(f"{VISION_DEMO}: training")
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=42, stratify=y
    )
    # Each digit twice, each time at random either smoothly upscaled from 8x8 or downscaled
    # from a blocky 64x64 drawing (what an uploaded picture of a digit looks like), and dark
    # on light or light on dark.
    rng = np.random.default_rng(seed)
    views = 2
    train_x = np.concatenate([x_train] * views)
    draws = rng.integers(0, 2, size=(len(train_x), 2))
    inputs = torch.from_numpy(_digit_inputs(train_x, [(1 + 7 * int(a), bool(b)) for a, b in draws]))
    targets = torch.from_numpy(np.tile(y_train, views)).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build("resnet-small", 10, in_channels=1)
        batch = 64
        steps = epochs * ((len(inputs) + batch - 1) // batch)
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
        net.train()
        for _ in range(epochs):
            order: Any = torch.randperm(len(inputs))  # Any: torch's typing is partial
            for idx in order.split(batch):
                loss: Any = torch.nn.functional.cross_entropy(net(inputs[idx]), targets[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        net.eval()
        test_x = np.concatenate([x_test, x_test])
        test_variants = [(8, True)] * len(x_test) + [(8, False)] * len(x_test)
        test_inputs = torch.from_numpy(_digit_inputs(test_x, test_variants))
        with torch.inference_mode():
            predicted = net(test_inputs).argmax(dim=1).numpy()
    accuracy = float(np.mean(predicted == np.tile(y_test, 2)))
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(weights)
    (folder / "model.toml").write_text(
        _VISION_TOML.format(
            name=VISION_DEMO,
            weights=_VISION_WEIGHTS,
            size=DIGIT_SIZE,
            labels=_quoted([str(d) for d in range(10)]),
        ),
        encoding="utf-8",
    )
    if progress:
        progress(f"{VISION_DEMO}: written (test accuracy {accuracy:.3f})")
    return DemoResult(VISION_DEMO, 1, accuracy, weights)
