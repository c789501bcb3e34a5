"""notebooks/native_api.ipynb runs top to bottom against the real server on a tiny checkpoint.

The code cells are executed in order in one namespace, as a kernel would (no jupyter needed). The
notebook's own `launch_server_cmd` / `wait_for_server` are the real ones, wrapped only to remember the
servers started (so they are stopped even when a cell fails), to skip the 5 s settle time, and to fail
fast instead of waiting forever when a server dies or never comes up.
"""

from __future__ import annotations

import json

import pytest

from serving import utils
from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "native_api.ipynb"
SERVER_START_TIMEOUT = 600


def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def code_cells(notebook: dict) -> list[str]:
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_notebook_is_a_clean_v4_notebook():
    notebook = load_notebook()
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["source"], list)
        if cell["cell_type"] == "code":  # committed without outputs
            assert cell["outputs"] == [] and cell["execution_count"] is None
    cells = code_cells(notebook)
    assert "launch_server_cmd(" in cells[0] and "wait_for_server(" in cells[0]
    assert cells[-1].strip() == "terminate_process(server_process)"


@pytest.fixture
def launched(monkeypatch) -> list:
    """Wrap the notebook helpers; yields the processes the notebook started, then stops any left."""
    processes: list = []
    real_launch, real_wait = utils.launch_server_cmd, utils.wait_for_server

    def launch_server_cmd(*args, **kwargs):
        process, port = real_launch(*args, **kwargs)
        processes.append(process)
        return process, port

    def wait_for_server(base_url, timeout=None, *, settle_seconds=5.0, process=None):
        real_wait(base_url, timeout or SERVER_START_TIMEOUT, settle_seconds=0,
                  process=process or (processes[-1] if processes else None))

    monkeypatch.setattr(utils, "launch_server_cmd", launch_server_cmd)
    monkeypatch.setattr(utils, "wait_for_server", wait_for_server)
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                utils.terminate_process(process)


def test_notebook_runs_top_to_bottom(tiny_llama_dir, launched, monkeypatch, capfd):
    monkeypatch.setenv("PALLAS_SERVE_MODEL_PATH", str(tiny_llama_dir))
    namespace: dict = {"__name__": "__main__"}
    for index, source in enumerate(code_cells(load_notebook())):
        try:
            exec(compile(source, f"{NOTEBOOK.name}, code cell {index}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"code cell {index} failed: {type(exc).__name__}: {exc}\n{source}") from exc
    assert namespace["model_path"] == str(tiny_llama_dir)
    assert len(launched) == 1
    assert launched[0].poll() is not None, "the notebook's last cell must stop its server"
    output = capfd.readouterr().out
    assert "Traceback" not in output, output[-5000:]
