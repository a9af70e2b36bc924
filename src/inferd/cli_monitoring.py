"""``inferd models profile DATA.csv``: write a version's ``reference.json`` from a CSV file.

With ``--model`` the CSV's columns are matched by name to the model's features (other columns,
a label or an id, are not read), the version is loaded to record its predictions on the data,
and the file goes beside the version's artifact. Without, every column is a feature and the
file goes to ``--output``. The format is in docs/monitoring.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["register"]

_out = Console()
_err = Console(stderr=True, soft_wrap=True)
_CHUNK = 4096  # rows per model call when recording predictions


def register(models_app: typer.Typer) -> None:
    """Add ``inferd models profile``."""
    models_app.command("profile")(profile)


def _fail(message: str, code: int = 2) -> typer.Exit:
    _err.print("error:", style="bold red", end=" ")
    _err.print(message, markup=False, highlight=False)
    return typer.Exit(code)


def profile(
    data: Annotated[
        Path,
        typer.Argument(
            help="CSV file with a header line naming the features; one row per example.",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="The model whose features the columns are; its predictions are recorded and "
            "the file goes into its version folder.",
        ),
    ] = None,
    version: Annotated[
        int | None, typer.Option("--version", help="The version (default: the latest).")
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option("--models-dir", "-m", help="Model repository folder [INFERD_MODELS_DIR]."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML settings file.")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write (default: the version folder with --model, else "
            "./reference.json).",
        ),
    ] = None,
    categorical: Annotated[
        list[str] | None,
        typer.Option("--categorical", help="A feature holding category codes; repeat for several."),
    ] = None,
    bins: Annotated[
        int, typer.Option("--bins", min=2, max=100, help="Bins per numeric feature.")
    ] = 10,
    predictions: Annotated[
        bool,
        typer.Option(
            "--predictions/--no-predictions",
            help="With --model, run the model on the data and record its predictions.",
        ),
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write a reference.json (feature bins, and the model's predictions) from a CSV file."""
    from inferd.errors import InferdError
    from inferd.monitoring import REFERENCE_FILE, build_reference, read_csv

    try:
        entry = _entry(model, config, models_dir) if model is not None else None
        if entry is not None:
            chosen = version if version is not None else entry.latest
            if chosen not in entry.versions:
                listed = ", ".join(str(v) for v in entry.versions)
                raise _fail(f"model {entry.name!r} has no version {chosen} (versions: {listed})")
            target = output or entry.folder / str(chosen) / REFERENCE_FILE
            features: list[str] | None = list(entry.spec.input.features)
            if not features:
                raise _fail(f"model {entry.name!r} takes {entry.spec.input.type}, not features")
        else:
            if version is not None:
                raise _fail("--version needs --model")
            chosen, target, features = 0, output or Path(REFERENCE_FILE), None
        if target.exists() and not force:
            raise _fail(f"{target} exists; use --force to replace it")
        with _progress() as progress:
            reading = progress.add_task(f"reading {data.name}", total=data.stat().st_size)
            header, rows = read_csv(
                data,
                features,
                lambda done, total: progress.update(reading, completed=done, total=total),
            )
            names = features if features is not None else header
            outputs, labels, task = None, None, "classification"
            if entry is not None and predictions:
                outputs, labels = _predict(entry, chosen, rows, progress)
                task = entry.spec.task
        reference = build_reference(
            rows,
            names,
            categorical=categorical or [],
            outputs=outputs,
            task=task,
            labels=labels,
            bins=bins,
            source=data.name,
        )
    except InferdError as exc:
        raise _fail(exc.message) from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(reference.dump(), encoding="utf-8")
    tmp.replace(target)
    if entry is not None and features is not None:
        ignored = [name for name in header if name not in features]
        if ignored:
            _err.print(f"columns not used: {', '.join(ignored)}", markup=False)
    _summary(reference, target)


def _entry(name: str, config: Path | None, models_dir: Path | None) -> Any:
    from inferd.models.repository import ModelRepository
    from inferd.settings import Settings

    settings = Settings.load(config, models_dir=models_dir)
    if settings.model_repository is not None:
        raise _fail(
            f"profile reads a local repository, not {settings.model_repository}: write the file "
            "with --output and upload it beside the version's artifact (docs/storage.md)"
        )
    return ModelRepository(settings.models_dir).read(name)


def _predict(entry: Any, version: int, rows: Any, progress: Progress) -> tuple[Any, Any]:
    """The model's outputs on ``rows``, and its labels (classifiers)."""
    import numpy as np

    from inferd.models.runtimes import create_model

    task = progress.add_task(f"predicting with {entry.name} v{version}", total=len(rows))
    model = create_model(entry.spec, version, entry.artifact(version))
    try:
        model.load()
    except Exception as exc:
        message = getattr(exc, "message", None) or repr(exc)
        raise _fail(f"could not load {entry.name} v{version}: {message}") from None
    try:
        parts = []
        for start in range(0, len(rows), _CHUNK):
            parts.append(np.asarray(model.predict(rows[start : start + _CHUNK])))
            progress.update(task, advance=len(parts[-1]))
        labels = entry.spec.output.labels
        if labels is None and entry.spec.task == "classification":
            classes = model.classes()
            labels = [str(c) for c in classes] if classes is not None else None
        return np.concatenate(parts), labels
    finally:
        model.unload()


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=_err,
        transient=True,
    )


def _summary(reference: Any, target: Path) -> None:
    table = Table(title=f"{target} ({reference.rows} rows)")
    for column in ("feature", "kind", "bins", "mean", "std"):
        table.add_column(column)
    for name, p in reference.features.items():
        numeric = p.kind == "numeric"
        table.add_row(
            name,
            p.kind,
            str(len(p.edges) + 1 if numeric else len(p.categories)),
            f"{p.mean:.4g}" if numeric and p.mean is not None else "-",
            f"{p.std:.4g}" if numeric and p.std is not None else "-",
        )
    _out.print(table)
    predicted = reference.predictions
    if predicted is not None and predicted.kind == "classes":
        shares = ", ".join(
            f"{label} {share:.1%}"
            for label, share in zip(predicted.labels, predicted.proportions or [], strict=False)
        )
        confidence = predicted.mean_confidence
        said = f"; mean confidence {confidence:.3f}" if confidence is not None else ""
        _out.print(f"predictions: {shares}{said}")
    elif predicted is not None:
        _out.print(f"predictions: {len(predicted.edges) + 1} bins of the predicted value")
    _out.print(f"[green]✓[/] wrote {target}")
