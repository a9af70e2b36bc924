"""``inferd models index|load|unload|rollback|split``: a running server's admin API from the shell.

Each command is one HTTP call to ``/v1/admin/...`` of the server at ``--url`` (INFERD_URL)
with ``--api-key`` (INFERD_API_KEY; a key with the ``admin`` scope when keys are on).
Exit codes: 0 done, 1 the server could not be reached or failed, 2 it refused the request
(unknown model or version, a version that failed to load, a bad argument).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["admin_call", "register"]

_out = Console()
_err = Console(stderr=True, soft_wrap=True)

UrlOpt = Annotated[
    str,
    typer.Option("--url", envvar="INFERD_URL", help="Server URL [INFERD_URL]."),
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="INFERD_API_KEY", help="API key [INFERD_API_KEY]."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the server's JSON answer.")]
NameArg = Annotated[str, typer.Argument(help="The model's name (its folder in the repository).")]

_DEFAULT_URL = "http://127.0.0.1:8000"
_LOAD_TIMEOUT_S = 600.0  # a big model may take minutes to load and warm up
_REFUSED = frozenset({400, 401, 403, 404, 409, 413, 415, 422})


def register(models_app: typer.Typer) -> None:
    """Add the admin commands to ``inferd models``."""
    models_app.command("index")(index)
    models_app.command("load")(load)
    models_app.command("unload")(unload)
    models_app.command("rollback")(rollback)
    models_app.command("split")(split)


def _fail(message: str, code: int) -> typer.Exit:
    _err.print("error:", style="bold red", end=" ")
    _err.print(message, markup=False, highlight=False)
    return typer.Exit(code)


def _call(method: str, url: str, path: str, api_key: str | None, body: Any = None) -> Any:
    """One admin call; a refusal or a failure becomes ``error: <the server's message>``."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    target = url.rstrip("/") + path
    try:
        response = httpx.request(
            method, target, json=body, headers=headers, timeout=_LOAD_TIMEOUT_S
        )
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the server at {url}: {exc}", 1) from None
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.is_success:
        return doc
    message = (
        doc["error"]["message"]
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict)
        else f"{response.status_code} {response.reason_phrase}"
    )
    raise _fail(message, 2 if response.status_code in _REFUSED else 1)


admin_call = _call
"""One call to the admin API (``inferd requests dead|requeue`` use it too)."""


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def _versions_table(doc: dict[str, Any]) -> Table:
    table = Table(title=f"{doc['name']} (default version {doc['default_version']})", box=box.SIMPLE)
    for column in ("version", "state", "default", "load s", "error"):
        table.add_column(column)
    for line in doc["versions"]:
        seconds = line.get("load_seconds")
        table.add_row(
            line["version"],
            line["state"],
            "✓" if line.get("default") else "",
            f"{seconds:.3f}" if isinstance(seconds, float) else "-",
            Text(line.get("error") or ""),
        )
    return table


def index(url: UrlOpt = _DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOut = False) -> None:
    """List every model and version in the server's repository, with its state."""
    doc = _call("GET", url, "/v1/admin/repository", api_key)
    if as_json:
        _print_json(doc)
        return
    table = Table(title=f"repository {doc['repository']}", box=box.SIMPLE)
    for column in ("model", "version", "state", "default", "reason"):
        table.add_column(column)
    for row in doc["models"]:
        style = {"READY": "green", "UNAVAILABLE": "red"}.get(row["state"], "yellow")
        table.add_row(
            Text(row["name"]),
            row["version"],
            f"[{style}]{row['state']}[/]",
            "✓" if row.get("default") else "",
            Text(row["reason"]),
        )
    _out.print(table)


def load(
    name: NameArg,
    version: Annotated[
        list[int] | None,
        typer.Option(
            "--version", "-v", help="A version to serve (repeat for several); default: the policy."
        ),
    ] = None,
    url: UrlOpt = _DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOut = False,
) -> None:
    """Load or reload a model: new versions warm up before traffic moves to them."""
    body = {"versions": version} if version else None
    doc = _call("POST", url, f"/v1/admin/models/{name}/load", api_key, body)
    if as_json:
        _print_json(doc)
        return
    _out.print(_versions_table(doc))


def unload(name: NameArg, url: UrlOpt = _DEFAULT_URL, api_key: KeyOpt = None) -> None:
    """Stop serving a model once its queued requests are answered."""
    _call("POST", url, f"/v1/admin/models/{name}/unload", api_key)
    _out.print(f"unloaded {name}", markup=False, highlight=False)


def rollback(
    name: NameArg,
    version: Annotated[int, typer.Argument(help="The version to make the default.")],
    url: UrlOpt = _DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOut = False,
) -> None:
    """Make a version the default again (loading it first if needed)."""
    doc = _call("POST", url, f"/v1/admin/models/{name}/default", api_key, {"version": version})
    if as_json:
        _print_json(doc)
        return
    _out.print(
        f"{name}: default version {doc['previous_default']} → {doc['default_version']}",
        markup=False,
        highlight=False,
    )
    _out.print(_versions_table(doc))


def split(
    name: NameArg,
    weights: Annotated[
        list[str] | None,
        typer.Argument(help="VERSION=WEIGHT pairs, e.g. 1=95 2=5; none: show the split."),
    ] = None,
    sticky_by: Annotated[
        str | None,
        typer.Option(
            "--sticky-by", help="'key' or 'header:<name>': the same caller gets the same version."
        ),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Drop the split set at run time.")] = False,
    url: UrlOpt = _DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOut = False,
) -> None:
    """Share a model's traffic between served versions by weight (e.g. `split iris 1=95 2=5`)."""
    path = f"/v1/admin/models/{name}/split"
    if clear:
        if weights:
            raise _fail("--clear takes no weights", 2)
        doc = _call("DELETE", url, path, api_key)
    elif weights:
        parsed: dict[str, float] = {}
        for pair in weights:
            version, sep, weight = pair.partition("=")
            try:
                if not sep or int(version) < 1:
                    raise ValueError(pair)
                parsed[str(int(version))] = float(weight)
            except ValueError:
                raise _fail(f"expected VERSION=WEIGHT such as 2=5, got {pair!r}", 2) from None
        body: dict[str, Any] = {"weights": parsed}
        if sticky_by is not None:
            body["sticky_by"] = sticky_by
        doc = _call("PUT", url, path, api_key, body)
    else:
        if sticky_by is not None:
            raise _fail("--sticky-by needs the weights too (e.g. 1=95 2=5)", 2)
        doc = _call("GET", url, path, api_key)
    if as_json:
        _print_json(doc)
        return
    current = doc.get("split")
    if current is None:
        _out.print(f"{name}: no split (requests go to the default version)", markup=False)
        return
    table = Table(title=f"{name} split ({current['source']})", box=box.SIMPLE)
    for column in ("version", "weight", "share", "rolled back"):
        table.add_column(column)
    for version, weight in current["weights"].items():
        table.add_row(
            version,
            f"{weight:g}",
            f"{current['shares'][version]:.1%}",
            Text(current["rolled_back"].get(version, "")),
        )
    _out.print(table)
    if current.get("sticky_by"):
        _out.print(f"sticky by {current['sticky_by']}", markup=False, highlight=False)
