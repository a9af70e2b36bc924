"""Running the HTTP server: one uvicorn process, or a supervisor of several (``--processes``).

One Python process uses one core. ``inferd serve --processes N`` runs N server processes on
one machine as one server:

* The supervisor (the process started) binds the listening socket once and forks the N server
  processes, which all accept on it (a shared socket: the kernel hands each new connection to
  one process waiting in accept; an idle process is the likeliest to take it). Each process
  builds the whole app: its own event loop, models, batchers and in-process workers.
* Each server process also listens on a Unix socket of its own in a private folder, where its
  siblings ask it for its own metrics, readiness, console summary and admin changes
  (:mod:`inferd.http.peers`): ``/metrics`` and ``/health/ready`` speak for the whole server,
  and a load, unload or rollback reaches every process.
* Per-key limits live in one place: Redis when ``redis_url`` is set, else one more process
  forked by the supervisor holding the one in-memory limiter
  (:mod:`inferd.tenancy.limits_socket`), so that a key's rate is not N times its limit.
* The database is migrated once, by the supervisor, before the processes start.
* SIGTERM (or SIGINT) to the supervisor: it stops accepting and forwards SIGTERM to every
  server process, each of which drains as a one-process server does; the limiter process
  stops last. A second signal kills them at once. A server process that dies (killed, a
  crash) is started again; one that exits with an error (a model failed to load) stops the
  whole server with its exit status. A server process whose supervisor dies gets SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from inferd.logs import get_logger
from inferd.settings import Settings

__all__ = ["available_cpus", "run_processes", "server_class", "uvicorn_config"]

log = get_logger("inferd.server")

#: Respawns of crashed server processes allowed within :data:`RESPAWN_WINDOW` seconds.
MAX_RESPAWNS = 5
RESPAWN_WINDOW = 60.0


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask (not the machine's count), bounded by a
    cgroup v2 CPU quota (a container's CPU limit), rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, -(-int(quota) // int(period))))


def server_class(child: bool = False) -> Any:
    """uvicorn's server, exiting 0 after a graceful stop on SIGTERM or SIGINT.

    The first signal stops taking connections and drains in-flight requests (within
    ``timeout_graceful_shutdown``); a second one exits at once. A server process of several
    (``child``) drains on SIGTERM only, ignores repeats (a service manager may signal every
    process of the group besides the supervisor's forwarding) and ignores SIGINT (a terminal's
    Ctrl-C reaches the supervisor, which forwards it); the supervisor kills it to stop at once.
    """
    import uvicorn

    signals = (signal.SIGTERM,) if child else (signal.SIGINT, signal.SIGTERM)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if child:
                self.should_exit = True
            else:
                super().handle_exit(sig, frame)

    return Server


def uvicorn_config(asgi: Any, settings: Settings) -> Any:
    """The uvicorn configuration every inferd server process runs with."""
    import uvicorn

    from inferd.http.protocol import HttpProtocol

    return uvicorn.Config(
        asgi,
        http=HttpProtocol,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )


# --------------------------------------------------------------------------- the supervisor


def run_processes(settings: Settings, count: int, syncer: Any = None) -> int:
    """Serve with ``count`` server processes until stopped; the exit status (see the module
    docstring). The database must be migrated already. :class:`OSError` if the address
    cannot be bound."""
    return _Supervisor(settings, count, syncer).run()


class _Supervisor:
    def __init__(self, settings: Settings, count: int, syncer: Any) -> None:
        self.settings = settings.model_copy(update={"auto_migrate": False})
        self.count = count
        self.syncer = syncer
        self.pid = os.getpid()
        self.rundir = tempfile.mkdtemp(prefix="inferd-")  # mode 0700: only this user
        self.token = secrets.token_hex(16)
        self.paths = [os.path.join(self.rundir, f"{i}.sock") for i in range(count)]
        self.limits_path = (
            os.path.join(self.rundir, "limits.sock") if settings.redis_url is None else None
        )
        self.sock: socket.socket | None = None
        self.servers: dict[int, int] = {}  # pid -> index
        self.limiter_pid: int | None = None
        self.stopping = False
        self.signals = 0
        self.code = 0
        self.respawns: list[float] = []

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        try:
            self.sock = _listen(self.settings.host, self.settings.port)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            if self.limits_path is not None:
                self._start_limiter()
            for index in range(self.count):
                if self.stopping:  # a signal during start-up
                    break
                self._start_server(index)
            host, port = self.sock.getsockname()[:2]
            log.info("serving", processes=self.count, url=f"http://{host}:{port}")
            self._supervise()
        finally:
            for pid in list(self.servers):  # an error above: leave nothing behind
                _kill(pid, signal.SIGKILL)
            if self.limiter_pid is not None:
                _kill(self.limiter_pid, signal.SIGKILL)
                _reap(self.limiter_pid)
            shutil.rmtree(self.rundir, ignore_errors=True)
            if self.sock is not None:
                self.sock.close()
        return self.code

    def _supervise(self) -> None:
        while self.servers:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            code = os.waitstatus_to_exitcode(status)
            if pid == self.limiter_pid:
                self.limiter_pid = None
                if not self.stopping:
                    log.error("the limiter process exited; starting it again", status=code)
                    self._start_limiter()
                continue
            index = self.servers.pop(pid, None)
            if index is None or self.stopping:
                continue
            if code > 0:  # it said why and exited: start-up failed, or a fatal error
                log.critical("a server process failed; stopping", process=index, status=code)
                self.code = code
                self._stop()
                continue
            now = time.monotonic()
            self.respawns = [t for t in self.respawns if now - t < RESPAWN_WINDOW]
            if len(self.respawns) >= MAX_RESPAWNS:
                log.critical("server processes keep dying; stopping", process=index, status=code)
                self.code = 1
                self._stop()
                continue
            self.respawns.append(now)
            log.error("a server process died; starting it again", process=index, status=code)
            self._start_server(index)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("stopping: draining every process", signal=signal.Signals(signum).name)
            self._stop()
        else:
            log.warning("stopping at once")
            for pid in list(self.servers):
                _kill(pid, signal.SIGKILL)

    def _stop(self) -> None:
        self.stopping = True
        if self.sock is not None:  # new connections go nowhere; the processes keep theirs
            self.sock.close()
            self.sock = None
        for pid in list(self.servers):
            _kill(pid, signal.SIGTERM)

    # ------------------------------------------------------------------ children
    def _fork(self, target: Callable[[], int]) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            code = target()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _start_limiter(self) -> None:
        assert self.limits_path is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.limits_path)
        self.limiter_pid = self._fork(self._limiter_main)
        end = time.monotonic() + 10.0
        while not os.path.exists(self.limits_path) and time.monotonic() < end:
            time.sleep(0.01)

    def _limiter_main(self) -> int:
        _as_child(self.pid, signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopped by the supervisor, last
        if self.sock is not None:
            self.sock.close()
        from inferd.tenancy.limits_socket import serve_limits

        assert self.limits_path is not None
        path = self.limits_path

        async def main() -> None:
            await serve_limits(path, asyncio.Event())

        asyncio.run(main())
        return 0

    def _start_server(self, index: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths[index])
        pid = self._fork(lambda: self._server_main(index))
        self.servers[pid] = index

    def _server_main(self, index: int) -> int:
        _as_child(self.pid, signal.SIGTERM)
        from inferd.app import create_app
        from inferd.http.peers import Peers

        assert self.sock is not None
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.bind(self.paths[index])
        peer.listen(128)
        failed: list[BaseException] = []
        server: Any = None

        def on_fatal(exc: BaseException) -> None:
            failed.append(exc)
            if server is not None:
                server.should_exit = True

        peers = Peers(index=index, paths=self.paths, token=self.token)
        asgi = create_app(
            self.settings,
            on_fatal=on_fatal,
            syncer=self.syncer,
            peers=peers,
            limits_socket=self.limits_path,
        )
        server = server_class(child=True)(uvicorn_config(asgi, self.settings))
        server.run(sockets=[self.sock, peer])
        if failed:
            message = getattr(failed[0], "message", None) or repr(failed[0])
            print(f"error: {message}", file=sys.stderr)
            return 1
        return 0 if server.started else 1


def _as_child(parent: int, on_parent_death: int) -> None:
    """Signal set-up of a forked process: SIGINT ignored (the supervisor forwards it) and
    ``on_parent_death`` sent to it when the supervisor dies (Linux)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, on_parent_death, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
