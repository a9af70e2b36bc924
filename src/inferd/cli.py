"""The ``inferd`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from inferd import __version__
from inferd.cli_admin import register as register_admin_commands
from inferd.cli_client import register as register_client_commands
from inferd.cli_monitoring import register as register_monitoring_commands
from inferd.errors import ConfigError, InferdError

__all__ = ["app", "main"]

app = typer.Typer(
    name="inferd",
    help="Serve machine-learning models over HTTP with micro-batching and load shedding.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(
    help="Inspect the model repository and create the demo models; load, unload and roll back "
    "models on a running server."
)
app.add_typer(models_app, name="models")
db_app = typer.Typer(help="The database of long-running requests.")
app.add_typer(db_app, name="db")
keys_app = typer.Typer(help="API keys: create (shown once), list, revoke.")
app.add_typer(keys_app, name="keys")

err = Console(stderr=True, soft_wrap=True)
out = Console()

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file (keys are the setting names)."),
]
ModelsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--models-dir",
        "-m",
        help="Model repository folder, or s3://bucket/prefix [INFERD_MODELS_DIR].",
    ),
]


def _fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` (never wrapped, never read as markup) and return the exit."""
    err.print("error:", style="bold red", end=" ")
    err.print(message, markup=False, highlight=False)
    return typer.Exit(code)


def _settings(config: Path | None, **overrides: Any) -> Any:
    from inferd.settings import Settings

    try:
        return Settings.load(config, **overrides)
    except ConfigError as exc:
        raise _fail(exc.message, 2) from None


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        out.print(f"inferd {__version__}")
        raise typer.Exit()


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [INFERD_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [INFERD_PORT].")] = None,
    grpc_port: Annotated[
        int | None,
        typer.Option(
            help="Also serve the Open Inference Protocol over gRPC on this port [INFERD_GRPC_PORT]."
        ),
    ] = None,
    models_dir: ModelsDirOpt = None,
    config: ConfigOpt = None,
    default_model: Annotated[
        str | None, typer.Option(help="Model for POST /predict [INFERD_DEFAULT_MODEL].")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning or error [INFERD_LOG_LEVEL].")
    ] = None,
    log_format: Annotated[
        str | None, typer.Option(help="json or console [INFERD_LOG_FORMAT].")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="In-process workers for long-running requests; 0: none [INFERD_WORKERS]."
        ),
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Database of requests [INFERD_DATABASE_URL].")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis for events across processes [INFERD_REDIS_URL].")
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            "-p",
            help="Server processes on the one port, each with its own models and batchers; "
            "0: one per available CPU [INFERD_PROCESSES].",
        ),
    ] = None,
) -> None:
    """Serve the models of the repository over HTTP (and gRPC with --grpc-port)."""
    settings = _settings(
        config,
        host=host,
        port=port,
        grpc_port=grpc_port,
        processes=processes,
        models_dir=models_dir,
        default_model=default_model,
        log_level=log_level,
        log_format=log_format,
        workers=workers,
        database_url=database_url,
        redis_url=redis_url,
    )
    from inferd.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)

    from inferd.app import create_app
    from inferd.models.repository import ModelRepository

    syncer = _sync_remote(settings)  # a bucket is copied to the local cache before binding
    try:  # fail fast, before binding, on a missing repository, model.toml or artifact
        entries = ModelRepository(settings.models_dir).entries(settings.models)
        if not entries:
            raise ConfigError(
                f"no models in {settings.models_dir}; run `inferd models train-demo` first"
            )
    except InferdError as exc:  # ModelNotFound too: a name in INFERD_MODELS that is not there
        raise _fail(exc.message, 2) from None

    from inferd.server import available_cpus, server_class, uvicorn_config

    count = settings.processes or available_cpus()
    if count > 1:
        _serve_processes(settings, count, syncer)
        return
    failed: list[BaseException] = []
    server: Any = None
    _Server = server_class()

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    asgi = create_app(settings, on_fatal=on_fatal, syncer=syncer)
    server = _Server(uvicorn_config(asgi, settings))
    server.run()
    if failed:
        raise _fail(getattr(failed[0], "message", None) or repr(failed[0]), 1)
    if not server.started:
        raise _fail("start-up failed; the log above says why", 1)


def _serve_processes(settings: Any, count: int, syncer: Any) -> None:
    """``serve`` with several processes (:mod:`inferd.server`): the database is migrated here,
    once, before they start."""
    import asyncio

    from inferd.backends import prepare_database
    from inferd.server import run_processes

    try:
        asyncio.run(prepare_database(settings))
    except InferdError as exc:
        raise _fail(f"the request store is not usable: {exc.message}", 1) from None
    try:
        code = run_processes(settings, count, syncer)
    except OSError as exc:
        raise _fail(f"cannot listen on {settings.host}:{settings.port}: {exc}", 1) from None
    if code:
        raise _fail("the server stopped: a process failed; the log above says why", code)


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-n", help="Jobs run at once [INFERD_WORKERS].")
    ] = None,
    models_dir: ModelsDirOpt = None,
    config: ConfigOpt = None,
    database_url: Annotated[
        str | None, typer.Option(help="Database of requests [INFERD_DATABASE_URL].")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis for waking API processes [INFERD_REDIS_URL].")
    ] = None,
    burst: Annotated[
        bool, typer.Option("--burst", help="Exit once no job is left to run.")
    ] = False,
) -> None:
    """Run long-running requests from the shared queue (scale these out)."""

    settings = _settings(
        config, models_dir=models_dir, database_url=database_url, redis_url=redis_url
    )
    from inferd.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    _sync_remote(settings)
    from inferd.concurrency import run_main
    from inferd.worker_process import run_worker

    try:
        ran = run_main(run_worker(settings, concurrency or max(settings.workers, 1), burst))
    except InferdError as exc:
        raise _fail(exc.message, 2) from None
    if burst:
        out.print(f"ran {ran} job(s)")


@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOpt = None,
    database_url: Annotated[
        str | None, typer.Option(help="Database of requests [INFERD_DATABASE_URL].")
    ] = None,
) -> None:
    """Create or migrate the schema to the latest version."""
    import asyncio

    settings = _settings(config, database_url=database_url)
    from inferd.db.migrate import migrate

    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(migrate(settings.effective_database_url))
    except InferdError as exc:
        raise _fail(exc.message, 2) from None
    out.print("database schema is up to date")


async def _with_keys(settings: Any, action: Any) -> Any:
    from inferd.db.migrate import migrate
    from inferd.jobs.sql import SqlStore
    from inferd.tenancy.keys import KeyStore

    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    await migrate(settings.effective_database_url)
    store = SqlStore(settings.effective_database_url)
    try:
        return await action(KeyStore(store.engine))
    finally:
        await store.close()


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option(help="Whose key: requests are stored under this user.")],
    scopes: Annotated[
        str, typer.Option(help="Comma-separated: predict, requests, admin.")
    ] = "predict,requests",
    rate: Annotated[
        str | None, typer.Option(help="Request rate limit, e.g. 50/s or 600/m.")
    ] = None,
    daily_tokens: Annotated[int | None, typer.Option(help="Token budget per UTC day.")] = None,
    name: Annotated[str | None, typer.Option(help="A label for people.")] = None,
    priority: Annotated[
        str,
        typer.Option(
            help="Its requests' priority in the models' queues, and the highest they may ask "
            "for with X-Inferd-Priority: high, normal or low."
        ),
    ] = "normal",
    config: ConfigOpt = None,
    database_url: Annotated[str | None, typer.Option(help="[INFERD_DATABASE_URL]")] = None,
) -> None:
    """Create a key and print it once; only its hash is stored."""
    import asyncio

    settings = _settings(config, database_url=database_url)
    wanted = [s.strip() for s in scopes.split(",") if s.strip()]
    try:
        key, record = asyncio.run(
            _with_keys(
                settings, lambda ks: ks.create(user, wanted, rate, daily_tokens, name, priority)
            )
        )
    except InferdError as exc:
        raise _fail(exc.message, 2) from None
    err.print(
        f"key {record.id} for {record.user} ({', '.join(sorted(record.scopes))}); "
        "it is shown only now:",
        markup=False,
    )
    sys.stdout.write(key + "\n")


@keys_app.command("list")
def keys_list(
    user: Annotated[str | None, typer.Option(help="Only this user's keys.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None,
    database_url: Annotated[str | None, typer.Option(help="[INFERD_DATABASE_URL]")] = None,
) -> None:
    """List keys (ids, users, scopes, limits; never the keys)."""
    import asyncio

    settings = _settings(config, database_url=database_url)
    try:
        records = asyncio.run(_with_keys(settings, lambda ks: ks.list(user)))
    except InferdError as exc:
        raise _fail(exc.message, 2) from None
    rows = [r.public() for r in records]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="API keys")
    for column in ("id", "user", "scopes", "rate", "daily tokens", "priority", "revoked"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["id"],
            row["user"],
            ",".join(row["scopes"]),
            row["rate"] or "-",
            str(row["daily_tokens"] or "-"),
            row["priority"],
            "yes" if row["revoked"] else "no",
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from `inferd keys list`).")],
    config: ConfigOpt = None,
    database_url: Annotated[str | None, typer.Option(help="[INFERD_DATABASE_URL]")] = None,
    redis_url: Annotated[str | None, typer.Option(help="[INFERD_REDIS_URL]")] = None,
) -> None:
    """Revoke a key; API processes sharing Redis forget it at once."""
    import asyncio

    settings = _settings(config, database_url=database_url, redis_url=redis_url)

    async def revoke(ks: Any) -> Any:
        record = await ks.revoke(key_id)
        if settings.redis_url:
            from inferd.jobs.events import create_event_bus
            from inferd.tenancy.auth import KEYS_CHANNEL

            bus = create_event_bus(settings.redis_url)
            try:
                await bus.publish(KEYS_CHANNEL, 0)
            finally:
                await bus.close()
        return record

    try:
        record = asyncio.run(_with_keys(settings, revoke))
    except InferdError as exc:
        raise _fail(exc.message, 2) from None
    out.print(f"revoked {record.id} ({record.user})", markup=False)


def _sync_remote(settings: Any, summary: bool = False) -> Any:
    """Sync a remote repository (``s3://``) into its cache; exit 2 when it cannot be read.

    Versions that fail verification are logged (naming the object) and left out. Returns the
    syncer (None for a local folder) so that the server does not sync twice."""
    from inferd.models.storage import create_syncer

    try:
        syncer = create_syncer(settings)
        if syncer is None:
            return None
        report = syncer.sync()
    except InferdError as exc:
        raise _fail(exc.message, 2) from None
    if summary:
        err.print(
            f"synced {syncer.url} → {report.cache}: {len(report.downloaded)} downloaded, "
            f"{report.reused} unchanged, {len(report.removed)} removed, "
            f"{len(report.failures)} failed",
            markup=False,
            highlight=False,
        )
    return syncer


@models_app.command("list")
def models_list(
    models_dir: ModelsDirOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the models in the repository with their versions and inputs."""
    settings = _settings(config, models_dir=models_dir)
    from inferd.models.repository import ModelRepository

    if settings.model_repository is not None:  # sync log lines go to stderr, not into --json
        from inferd.logs import configure_logging

        configure_logging("warning", "console", stream=sys.stderr)
        _sync_remote(settings, summary=True)
    repo = ModelRepository(settings.models_dir)
    try:
        entries = repo.entries()
    except ConfigError as exc:
        raise _fail(exc.message, 2) from None
    rows: list[dict[str, Any]] = [
        {
            "name": e.name,
            "versions": list(e.versions),
            "served_version": e.latest,
            "runtime": e.spec.runtime,
            "task": e.spec.task,
            "features": e.spec.input.features,
            "labels": e.spec.output.labels,
            "description": e.spec.description,
        }
        for e in entries
    ]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        out.print(f"no models in {repo.root}; run `inferd models train-demo`")
        return
    table = Table(title=f"models in {settings.model_repository or repo.root}")
    for column in ("name", "versions", "runtime", "task", "inputs", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            ", ".join(str(v) for v in row["versions"]),
            row["runtime"],
            row["task"],
            str(len(row["features"])),
            row["description"],
        )
    out.print(table)


@models_app.command("train-demo")
def models_train_demo(
    models_dir: ModelsDirOpt = None,
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain models already present.")] = False,
    vision: Annotated[
        bool,
        typer.Option(
            "--vision",
            help="Also train the digits image model (needs torch: pip install 'inferd[vision]').",
        ),
    ] = False,
) -> None:
    """Train the demo models (iris, iris-forest; digits with --vision) into the repository."""
    settings = _settings(config, models_dir=models_dir)
    from inferd.models.demo import DEMO_MODELS, train_demo

    if settings.model_repository is not None:
        raise _fail(
            f"train-demo writes to a local folder, not to {settings.model_repository}: train into "
            "a folder (--models-dir ./models) and upload it (docs/storage.md)",
            2,
        )
    target: Path = settings.models_dir
    target.mkdir(parents=True, exist_ok=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task("training demo models", total=len(DEMO_MODELS) * 2)

        def step(message: str) -> None:
            progress.update(task, description=message, advance=1)

        results = train_demo(target, force=force, progress=step)
        progress.update(task, completed=len(DEMO_MODELS) * 2)
        if vision:
            results.extend(_train_vision_demo(target, force, step))
    for result in results:
        out.print(
            f"[green]✓[/] {result.name} v{result.version}: accuracy {result.accuracy:.3f} "
            f"→ {result.path}"
        )
    if not results:
        out.print(f"demo models already in {target} (use --force to retrain)")


def _train_vision_demo(target: Path, force: bool, step: Any) -> list[Any]:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise _fail("the digits demo needs PyTorch: pip install 'inferd[vision]'", 2) from None
    from inferd.models.demo import train_vision_demo

    result = train_vision_demo(target, force=force, progress=step)
    return [result] if result is not None else []


register_client_commands(app)  # inferd predict, inferd requests ...
register_admin_commands(models_app)  # inferd models index, load, unload, rollback
register_monitoring_commands(models_app)  # inferd models profile


def main() -> None:
    app()


if __name__ == "__main__":
    main()
