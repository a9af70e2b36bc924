"""``inferd predict`` and ``inferd requests ...``: the client on the command line.

Every command talks to a running server (``--url``, INFERD_URL; ``--api-key``,
INFERD_API_KEY) through :mod:`inferd.client`, so it gets the same retries and stream resume.
``inferd requests dead`` and ``inferd requests requeue`` call the admin API
(``/v1/admin/requests``; a key with the ``admin`` scope when keys are on).
Exit codes: 0 done, 1 the server or the connection failed (or the request did), 2 the input
was wrong (refused by the command itself or by the server with 400, 404, 409, 413, 415, 422).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from datetime import UTC
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from inferd.client import Client, Event, InferdClientError

__all__ = ["register"]

requests_app = typer.Typer(
    help="Long-running requests on a server: submit, follow, list, get, cancel; dead letters "
    "(dead, requeue) for admins.",
    no_args_is_help=True,
)

_err = Console(stderr=True, soft_wrap=True)

UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="INFERD_URL", help="Server URL [INFERD_URL; http://127.0.0.1:8000]."
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="INFERD_API_KEY", help="API key [INFERD_API_KEY]."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON.")]

_BAD_INPUT = frozenset({400, 404, 409, 413, 415, 422})


def register(app: typer.Typer) -> None:
    """Add ``predict`` and the ``requests`` group to the ``inferd`` command."""
    app.command("predict")(predict)
    app.add_typer(requests_app, name="requests")


def _fail(message: str, code: int) -> typer.Exit:
    _err.print("error:", style="bold red", end=" ")
    _err.print(message, markup=False, highlight=False)
    return typer.Exit(code)


def _exit_code(error: InferdClientError) -> int:
    return 2 if error.status in _BAD_INPUT else 1


@contextlib.contextmanager
def _client(url: str | None, api_key: str | None) -> Iterator[Client]:
    """A client, with every client error turned into ``error: ...`` and its exit code."""
    from inferd.client import Client, InferdClientError

    try:
        with Client(url, api_key) as client:
            yield client
    except InferdClientError as exc:
        raise _fail(exc.message, _exit_code(exc)) from None
    except ValueError as exc:
        raise _fail(str(exc), 2) from None


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, default=str) + "\n")


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _fail(f"{what} is not valid JSON: {exc}", 2) from None


def _numbers(values: list[str]) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        bad = next(v for v in values if not _is_number(v))
        raise _fail(f"feature {bad!r} is not a number", 2) from None


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def predict(
    features: Annotated[
        list[str] | None,
        typer.Argument(help="Feature values of one row (put -- before a negative first value)."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model name; default: the server's.")
    ] = None,
    version: Annotated[str | None, typer.Option("--version", "-v", help="Model version.")] = None,
    body: Annotated[
        str | None,
        typer.Option(
            "--json", help='The request as JSON: {"features": [...]} or {"instances": [[...]]}.'
        ),
    ] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Predict one row (or, with --json instances, many) and print the answer as JSON."""
    rows: Any = None
    row: Any = None
    request_id = None
    if body is not None:
        if features:
            raise _fail("give the features as arguments or --json, not both", 2)
        doc = _parse_json(body, "--json")
        if not isinstance(doc, dict) or ("features" in doc) == ("instances" in doc):
            raise _fail('--json must be an object with "features" or "instances"', 2)
        row, rows, request_id = doc.get("features"), doc.get("instances"), doc.get("request_id")
    elif features:
        row = _numbers(features)
    else:
        raise _fail("give the feature values (inferd predict 5.1 3.5 1.4 0.2) or --json", 2)
    with _client(url, api_key) as client:
        if rows is not None:
            answers = client.predict_batch(rows, model, version, request_id=request_id)
            _print_json([dataclasses.asdict(a) for a in answers])
        else:
            answer = client.predict(row, model, version, request_id=request_id)
            _print_json(dataclasses.asdict(answer))


def _show(event: Event, as_json: bool, state: dict[str, bool]) -> None:
    """Print one event: a chunk as it came (text as is, anything else as a JSON line)."""
    from inferd.client import ResponseEvent

    if as_json:
        _print_json({"id": event.id, "event": event.name, "data": event.data})
    elif isinstance(event, ResponseEvent):
        chunk = event.response
        text = chunk if isinstance(chunk, str) else json.dumps(chunk, default=str) + "\n"
        sys.stdout.write(text)
        state["open_line"] = bool(text) and not text.endswith("\n")
    sys.stdout.flush()


def _follow(client: Client, request_id: str, as_json: bool, after: int | None) -> None:
    from inferd.client import ErrorEvent

    state = {"open_line": False}
    failed: ErrorEvent | None = None
    for event in client.stream(request_id, after):
        _show(event, as_json, state)
        if isinstance(event, ErrorEvent):
            failed = event
    if state["open_line"]:
        sys.stdout.write("\n")
    if failed is not None:
        raise _fail(f"request {request_id} {failed.status}: {failed.error}", 1)


@requests_app.command("submit")
def submit(
    model: Annotated[str, typer.Option("--model", "-m", help="A served model's name.")],
    input: Annotated[
        str,
        typer.Option("--input", "-i", help="The model's input: JSON, else taken as a string."),
    ],
    parameters: Annotated[
        str | None, typer.Option("--parameters", "-p", help='JSON object, e.g. {"chunks": 3}.')
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Resubmitting with the same key returns the same request."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Print the responses as they arrive.")
    ] = False,
    ttl: Annotated[
        float | None,
        typer.Option("--ttl", help="Seconds it may wait for a worker; then it ends expired."),
    ] = None,
    as_json: JsonOut = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Submit a long-running request; print its id (or, with --follow, its responses)."""
    try:
        value: Any = json.loads(input)
    except ValueError:
        value = input
    params = _parse_json(parameters, "--parameters") if parameters is not None else None
    if params is not None and not isinstance(params, dict):
        raise _fail("--parameters must be a JSON object", 2)
    with _client(url, api_key) as client:
        job = client.submit(model, value, params, idempotency_key, ttl_seconds=ttl)
        if not follow:
            if as_json:
                _print_json(dataclasses.asdict(job))
            else:
                sys.stdout.write(job.id + "\n")
            return
        _err.print(f"submitted {job.id}", markup=False, highlight=False)
        _follow(client, job.id, as_json, None)


@requests_app.command("follow")
def follow_cmd(
    request_id: Annotated[str, typer.Argument(help="The request's id.")],
    last_event_id: Annotated[
        int | None, typer.Option(help="Resume after this event id (from --json output).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print every event as a JSON line.")
    ] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Print a request's responses as they arrive, until it ends."""
    with _client(url, api_key) as client:
        _follow(client, request_id, as_json, last_event_id)


@requests_app.command("list")
def list_cmd(
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many, newest first.")] = 20,
    as_json: JsonOut = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """List your requests, newest first (pages through the server's cursor)."""
    if limit < 1:
        raise _fail(f"--limit must be at least 1, got {limit}", 2)
    with _client(url, api_key) as client:
        found = list(client.list(limit, page_size=min(limit, 100)))
    if as_json:
        _print_json([r.raw for r in found])
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("id", "model", "status", "tries", "chunks", "created (UTC)"):
        table.add_column(column, no_wrap=column == "id")
    for r in found:
        created = r.created_at.astimezone(UTC).strftime("%m-%d %H:%M:%S") if r.created_at else "-"
        table.add_row(r.id, r.model, r.status, str(r.attempts), str(len(r.responses)), created)
    # Piped, rich would squeeze the table into 80 columns and cut the ids.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@requests_app.command("get")
def get_cmd(
    request_id: Annotated[str, typer.Argument(help="The request's id.")],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Print a request's stored record as JSON (status, responses, result or error)."""
    with _client(url, api_key) as client:
        _print_json(client.get(request_id).raw)


@requests_app.command("cancel")
def cancel_cmd(
    request_id: Annotated[str, typer.Argument(help="The request's id.")],
    as_json: JsonOut = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Cancel a request: a queued one never runs, a running one stops soon."""
    with _client(url, api_key) as client:
        record = client.cancel(request_id)
    if as_json:
        _print_json(record.raw)
    else:
        sys.stdout.write(f"{record.id} {record.status}\n")


_DEFAULT_URL = "http://127.0.0.1:8000"


def _dead_letters(
    url: str, api_key: str | None, statuses: list[str], model: str | None, limit: int
) -> list[dict[str, Any]]:
    """Up to ``limit`` dead letters, newest first, following the server's cursor."""
    from urllib.parse import urlencode

    from inferd.cli_admin import admin_call

    found: list[dict[str, Any]] = []
    cursor = None
    while len(found) < limit:
        query: dict[str, Any] = {"status": statuses, "limit": min(100, limit - len(found))}
        if model is not None:
            query["model"] = model
        if cursor is not None:
            query["cursor"] = cursor
        doc = admin_call("GET", url, "/v1/admin/requests?" + urlencode(query, doseq=True), api_key)
        found.extend(doc["requests"])
        cursor = doc["next_cursor"]
        if cursor is None:
            break
    return found


StatusOpt = Annotated[
    list[str] | None,
    typer.Option("--status", "-s", help="dead (default), failed or expired; repeat for several."),
]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Only this model's.")]


@requests_app.command("dead")
def dead_cmd(
    status: StatusOpt = None,
    model: ModelOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many, newest first.")] = 20,
    as_json: JsonOut = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """List dead letters: every user's requests that ended dead (or failed, expired)."""
    if limit < 1:
        raise _fail(f"--limit must be at least 1, got {limit}", 2)
    found = _dead_letters(url or _DEFAULT_URL, api_key, status or ["dead"], model, limit)
    if as_json:
        _print_json(found)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("id", "user", "model", "status", "tries", "error"):
        table.add_column(column, no_wrap=column == "id")
    for r in found:
        error = (r.get("error") or "")[:80]
        table.add_row(r["id"], r["user"], r["model"], r["status"], str(r["attempts"]), error)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@requests_app.command("requeue")
def requeue_cmd(
    request_ids: Annotated[
        list[str] | None, typer.Argument(help="The requests to queue again.")
    ] = None,
    all_dead: Annotated[
        bool,
        typer.Option("--all", help="Every dead letter (of --status, --model) instead of ids."),
    ] = False,
    status: StatusOpt = None,
    model: ModelOpt = None,
    attempts: Annotated[
        int | None,
        typer.Option(help="Attempts each gets from now on; default: the server's max_attempts."),
    ] = None,
    limit: Annotated[int, typer.Option(help="With --all: at most this many.")] = 1000,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Queue dead (or failed, expired) requests again: same ids, more attempts."""
    from inferd.cli_admin import admin_call

    if bool(request_ids) == all_dead:
        raise _fail("give request ids or --all, not both (and not neither)", 2)
    if attempts is not None and attempts < 1:
        raise _fail(f"--attempts must be at least 1, got {attempts}", 2)
    base = url or _DEFAULT_URL
    ids = list(request_ids or [])
    if all_dead:
        ids = [r["id"] for r in _dead_letters(base, api_key, status or ["dead"], model, limit)]
    body = {"attempts": attempts} if attempts is not None else None
    for request_id in ids:
        doc = admin_call("POST", base, f"/v1/admin/requests/{request_id}/requeue", api_key, body)
        sys.stdout.write(f"{doc['id']} {doc['status']}\n")
    if all_dead:
        _err.print(f"requeued {len(ids)} request(s)", markup=False, highlight=False)
