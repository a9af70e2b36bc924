"""The demo models, trained from the iris data that scikit-learn ships (no download)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEMO_MODELS", "DemoResult", "train_demo"]

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
    """Train and write every demo model that is missing (all of them with ``force``)."""
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
            if progress:
                progress(f"{name}: already present")
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
