"""Notebook helpers (serving/utils.py) against a tiny stand-in server started as a real subprocess."""

from __future__ import annotations

import sys
import textwrap
import time
import types

import pytest

from serving import utils
from serving.utils import (
    _alive,
    _children_of,
    _command_to_argv,
    http_request,
    launch_server_cmd,
    print_highlight,
    reserve_port,
    terminate_process,
    wait_for_server,
)

# Serves /v1/models like our server would, plus /echo and /stream, and starts a child that ignores
# SIGTERM so terminate_process has a whole tree to take down (and must escalate to SIGKILL).
FAKE_SERVER = textwrap.dedent(
    """
    import argparse, json, subprocess, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, status, payload):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/v1/models":
                self.reply(200, {"object": "list", "data": [{"id": "fake"}], "child_pid": child.pid,
                                 "authorization": self.headers.get("Authorization")})
            else:
                self.reply(404, {"detail": "Not Found"})

        def do_POST(self):
            data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/stream":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for i in range(3):
                    self.wfile.write(b"data: " + json.dumps({"i": i}).encode() + b"\\n\\n")
                self.wfile.write(b"data: [DONE]\\n\\n")
                self.close_connection = True
                return
            self.reply(200, {"echo": data, "content_type": self.headers.get("Content-Type"),
                             "authorization": self.headers.get("Authorization")})

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    """
)


def _launch_fake(directory):
    script = directory / "fake_server.py"
    script.write_text(FAKE_SERVER)
    # A backslash-newline continuation, as notebooks write long commands.
    return launch_server_cmd(f"{sys.executable} {script} \\\n    --host 127.0.0.1", host="127.0.0.1")


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    """One stand-in server shared by the tests that only talk to it."""
    process, port = _launch_fake(tmp_path_factory.mktemp("fake"))
    try:
        yield process, port
    finally:
        terminate_process(process, grace_seconds=1.0)


def test_launch_wait_and_terminate_whole_tree(tmp_path, capsys):
    process, port = _launch_fake(tmp_path)
    try:
        assert 30000 <= port < 40000
        lock = utils._port_locks[process]
        base_url = f"http://127.0.0.1:{port}"
        wait_for_server(base_url, timeout=60, settle_seconds=0, process=process)
        assert "NOTE:" in capsys.readouterr().out

        info = http_request(f"{base_url}/v1/models").json()
        assert info["authorization"] is None and info["data"] == [{"id": "fake"}]
        child_pid = info["child_pid"]
        assert _alive(child_pid)
        assert child_pid in _children_of(process.pid)

        start = time.monotonic()
        terminate_process(process, grace_seconds=1.0)
        assert time.monotonic() - start < 10
        assert process.returncode is not None
        assert not _alive(child_pid)  # it ignored SIGTERM, so this took the SIGKILL escalation
        assert process not in utils._port_locks and lock.fileno() == -1
    finally:
        terminate_process(process, grace_seconds=1.0)  # idempotent


def test_http_request_shapes(fake_server):
    process, port = fake_server
    base_url = f"http://127.0.0.1:{port}"
    wait_for_server(base_url, timeout=60, settle_seconds=0, process=process)

    response = http_request(f"{base_url}/echo", json={"text": "hi"}, api_key="sk-x")
    assert response.status_code == 200
    body = response.json()
    assert body == {"echo": {"text": "hi"}, "content_type": "application/json; charset=utf-8",
                    "authorization": "Bearer sk-x"}

    missing = http_request(f"{base_url}/nope")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}

    streamed = http_request(f"{base_url}/stream", json={"stream": True}, stream=True)
    lines = [line for line in streamed.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]" and len(lines) == 4


def test_http_request_stream_without_requests(fake_server, monkeypatch):
    process, port = fake_server
    base_url = f"http://127.0.0.1:{port}"
    wait_for_server(base_url, timeout=60, settle_seconds=0, process=process)
    monkeypatch.setitem(sys.modules, "requests", None)  # import requests -> ImportError
    streamed = http_request(f"{base_url}/stream", json={"stream": True}, stream=True)
    assert isinstance(streamed, utils.HttpResponse)
    lines = [line for line in streamed.iter_lines() if line]
    assert lines == [b'data: {"i": 0}', b'data: {"i": 1}', b'data: {"i": 2}', b"data: [DONE]"]


def test_wait_for_server_times_out_when_nothing_listens(monkeypatch):
    monkeypatch.setitem(sys.modules, "requests", None)  # also exercises the urllib path
    port, lock = reserve_port("127.0.0.1")
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="Server did not become ready within timeout period"):
            wait_for_server(f"http://127.0.0.1:{port}", timeout=0.5, settle_seconds=0)
        assert time.monotonic() - start < 10
    finally:
        lock.close()


def test_wait_for_server_notices_a_dead_process():
    process, port = launch_server_cmd(f"{sys.executable} -c pass", host="127.0.0.1")
    try:
        with pytest.raises(RuntimeError, match="exited with code 0 before becoming ready"):
            wait_for_server(f"http://127.0.0.1:{port}", timeout=60, settle_seconds=0, process=process)
    finally:
        terminate_process(process)
    assert process not in utils._port_locks


def test_launch_with_explicit_port_reserves_nothing():
    process, port = launch_server_cmd(f"{sys.executable} -c pass", port=34567)
    try:
        assert port == 34567 and process not in utils._port_locks
        assert process.args[-2:] == ["--port", "34567"]
    finally:
        terminate_process(process)


def test_command_to_argv():
    assert _command_to_argv("python3 -m serving.main --model-path m \\\n  --host 0.0.0.0") == [
        sys.executable, "-m", "serving.main", "--model-path", "m", "--host", "0.0.0.0"]
    assert _command_to_argv("\npython -m serving.main \\\r\n --log-level warning\n")[0] == sys.executable
    assert _command_to_argv("python3 -m other.module --x 1")[0] == "python3"
    assert _command_to_argv("python3 script.py")[0] == "python3"


def test_children_of_without_psutil(monkeypatch, fake_server):
    process, port = fake_server
    wait_for_server(f"http://127.0.0.1:{port}", timeout=60, settle_seconds=0, process=process)
    with_psutil = sorted(_children_of(process.pid))
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert sorted(_children_of(process.pid)) == with_psutil and with_psutil


def test_print_highlight_plain(monkeypatch, capsys):
    monkeypatch.delenv("SGLANG_IS_IN_CI", raising=False)
    print_highlight("hello\nworld")
    assert capsys.readouterr().out == "hello\nworld\n"


def test_print_highlight_html_in_ci(monkeypatch, capsys):
    shown = []
    display_module = types.ModuleType("IPython.display")
    display_module.HTML = lambda html: ("HTML", html)
    display_module.display = shown.append
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    monkeypatch.setitem(sys.modules, "IPython.display", display_module)
    monkeypatch.setenv("SGLANG_IS_IN_CI", "true")
    print_highlight("a\nb")
    assert shown == [("HTML", "<strong style='color: #00008B;'>a<br>b</strong>")]
    assert capsys.readouterr().out == ""


def test_print_highlight_in_ci_without_ipython(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "IPython", None)
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    monkeypatch.setenv("SGLANG_IS_IN_CI", "1")
    print_highlight("plain")
    assert capsys.readouterr().out == "plain\n"
