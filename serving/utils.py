"""Helpers for notebooks and scripts that start a server and talk to it.

They mirror `sglang.utils` (shared/reference/api-contract.md section 10.1) so the SGLang docs'
notebooks run with one changed import:

    from serving.utils import launch_server_cmd, wait_for_server, terminate_process, print_highlight
    process, port = launch_server_cmd("python3 -m serving.main --host 0.0.0.0 --log-level warning")
    wait_for_server(f"http://localhost:{port}")
    ...
    terminate_process(process)

Only the standard library is needed; `requests` is used when installed (it is a dev dependency) and
`psutil` likewise, with urllib and /proc as fallbacks.

Differences from SGLang, all deliberate: `wait_for_server` also honours its timeout while nothing
listens yet (SGLang only checks it after an HTTP error reply, so a server that never comes up hangs
it forever), sleeps between polls in every case, and can watch the server process so a crash fails
fast; `terminate_process` sends SIGTERM first and SIGKILL only to what is still alive after a grace
period; a command starting with `python -m serving.main` runs on the current interpreter.
"""

from __future__ import annotations

import json as jsonlib
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

__all__ = [
    "HttpResponse",
    "http_request",
    "launch_server_cmd",
    "print_highlight",
    "reserve_port",
    "terminate_process",
    "wait_for_server",
]

# Port-reservation sockets, kept open until terminate_process(process) so that two launches in one
# notebook do not pick the same port.
_port_locks: dict[subprocess.Popen, socket.socket] = {}

_READY_NOTE = """
NOTE: Typically, the server runs in a separate terminal.
In this notebook, we run the server and notebook code together, so their outputs are combined.
To improve clarity, the server logs are displayed in the original black color, while the notebook outputs are highlighted in blue.
To reduce the log length, we set the log level to warning for the server, the default log level is INFO.
Throughput in a notebook run is not representative of the server's actual performance.
"""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def print_highlight(x: Any) -> None:
    """Print `x`; as bold dark-blue HTML through IPython when SGLANG_IS_IN_CI is set (rendered notebooks)."""
    if _env_true("SGLANG_IS_IN_CI"):
        try:
            from IPython.display import HTML, display
        except ImportError:
            print(x)
            return
        html = str(x).replace("\n", "<br>")
        display(HTML(f"<strong style='color: #00008B;'>{html}</strong>"))
    else:
        print(x)


# ---------------------------------------------------------------------------------------------------
# Launching and stopping a server
# ---------------------------------------------------------------------------------------------------


def reserve_port(host: str = "0.0.0.0", start: int = 30000, end: int = 40000) -> tuple[int, socket.socket]:
    """Bind a socket to a random free port in [start, end) and return it as a lock.

    The socket is bound with SO_REUSEADDR but never listens, so the server (which also sets
    SO_REUSEADDR, as asyncio / Sanic / http.server do) can still bind and listen on the port.
    """
    candidates = list(range(start, end))
    random.shuffle(candidates)
    for port in candidates:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            continue
        return port, sock
    raise RuntimeError(f"No free port in [{start}, {end}) on {host}.")


def _command_to_argv(command: str) -> list[str]:
    """Collapse backslash-newline continuations and split on whitespace (no shell)."""
    command = command.replace("\\\r\n", " ").replace("\\\n", " ")
    argv = [part for part in command.split() if part != "\\"]
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1:3] == ["-m", "serving.main"]:
        # Run the server on this interpreter, i.e. inside the current virtual environment.
        argv[0] = sys.executable
    return argv


def launch_server_cmd(command: str, host: str = "0.0.0.0", port: int | None = None) -> tuple[subprocess.Popen, int]:
    """Start `command --port <port>` as a subprocess; return (process, port).

    Without `port`, a free one in [30000, 40000) is reserved on `host` and held until
    `terminate_process(process)`. The server's stderr is merged into its stdout, which is inherited
    (not captured), so its logs appear where this Python process writes its own.
    """
    lock = None
    if port is None:
        port, lock = reserve_port(host)
    argv = _command_to_argv(command) + ["--port", str(port)]
    try:
        process = subprocess.Popen(argv, text=True, stderr=subprocess.STDOUT)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    if lock is not None:
        _port_locks[process] = lock
    return process, port


def _children_of(pid: int) -> list[int]:
    """All descendants of `pid` (children first, then theirs)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: fields restart after the last ')'.
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie counts as dead: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def terminate_process(process: subprocess.Popen, grace_seconds: float = 5.0) -> None:
    """Stop `process` and every process it started, then release its reserved port.

    SIGTERM goes to the whole tree first; whatever is still alive after `grace_seconds` gets SIGKILL.
    """
    try:
        descendants = _children_of(process.pid)
        if process.poll() is None:
            _signal_all([process.pid], signal.SIGTERM)
        _signal_all(descendants, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            if process.poll() is not None and not any(_alive(pid) for pid in descendants):
                break
            time.sleep(0.05)
        survivors = [pid for pid in descendants if _alive(pid)]
        if process.poll() is None:
            survivors.append(process.pid)
        _signal_all(survivors, signal.SIGKILL)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            pass
        # SIGKILL is delivered asynchronously: return only once the tree is really gone.
        deadline = time.monotonic() + grace_seconds
        while any(_alive(pid) for pid in survivors) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        lock = _port_locks.pop(process, None)
        if lock is not None:
            lock.close()


def _get_status(url: str, headers: dict[str, str]) -> int | None:
    """HTTP status of GET url, or None when nothing answers."""
    try:
        import requests
    except ImportError:
        requests = None
    if requests is not None:
        try:
            return requests.get(url, headers=headers, timeout=5).status_code
        except requests.exceptions.RequestException:
            return None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def wait_for_server(
    base_url: str,
    timeout: float | None = None,
    *,
    settle_seconds: float = 5.0,
    process: subprocess.Popen | None = None,
) -> None:
    """Poll `GET {base_url}/v1/models` once a second until it answers 200.

    Sends `Authorization: Bearer None` as SGLang does, so it only works against a server without an
    API key. On success waits `settle_seconds` (SGLang waits 5 s so start-up logs settle) and prints
    a note via `print_highlight`. Raises TimeoutError after `timeout` seconds (None or 0: wait
    forever) and RuntimeError when `process` is given and exits first.
    """
    url = base_url.rstrip("/") + "/v1/models"
    start = time.perf_counter()
    while True:
        if _get_status(url, {"Authorization": "Bearer None"}) == 200:
            if settle_seconds > 0:
                time.sleep(settle_seconds)
            print_highlight(_READY_NOTE)
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"Server process exited with code {process.returncode} before becoming ready.")
        if timeout and time.perf_counter() - start > timeout:
            raise TimeoutError("Server did not become ready within timeout period")
        time.sleep(1)


# ---------------------------------------------------------------------------------------------------
# A small HTTP client
# ---------------------------------------------------------------------------------------------------


class HttpResponse:
    """A minimal response: `status_code`, `headers`, `content`, `text`, `json()`, `iter_lines()`.

    Wraps an urllib response (or HTTPError, which carries the error body). The body is read on first
    access of content/text/json, or streamed by iter_lines.
    """

    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.status_code: int = resp.status if hasattr(resp, "status") else resp.code
        self.headers = resp.headers
        self._content: bytes | None = None

    @property
    def content(self) -> bytes:
        if self._content is None:
            self._content = self._resp.read()
            self._resp.close()
        return self._content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)

    def iter_lines(self) -> Iterator[bytes]:
        """Body lines without their line endings, as they arrive (SSE streams)."""
        try:
            for line in self._resp:
                yield line.rstrip(b"\r\n")
        finally:
            self._resp.close()

    def close(self) -> None:
        self._resp.close()


def _ssl_context(verify: Any) -> ssl.SSLContext | None:
    if verify is None or verify is True:
        return None
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=verify)


def http_request(
    url: str,
    json: Any = None,
    stream: bool = False,
    api_key: str | None = None,
    verify: Any = None,
    method: str | None = None,
) -> Any:
    """Send one JSON request, like `sglang.utils.http_request`.

    GET when there is no `json` and no `method`, POST when `json` is given (or `method`). Sends
    `Content-Type: application/json; charset=utf-8` and, with `api_key`, `Authorization: Bearer <key>`.
    Error statuses are returned, not raised. `stream=True` returns a `requests` streaming response
    (POST) when requests is installed, else an `HttpResponse` to read with `iter_lines()`.
    `verify`: None/True = default certificate checks, False = none, a path = that CA bundle.
    """
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    if stream:
        try:
            import requests
        except ImportError:
            requests = None
        if requests is not None:
            return requests.request(method or "POST", url, json=json, stream=True, headers=headers,
                                    verify=True if verify is None else verify)
        if method is None:
            method = "POST"
    data = None if json is None else jsonlib.dumps(json).encode("utf-8")
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        return HttpResponse(urllib.request.urlopen(req, context=_ssl_context(verify)))
    except urllib.error.HTTPError as exc:
        return HttpResponse(exc)
