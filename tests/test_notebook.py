"""Both notebooks run top to bottom in a real Jupyter kernel (nbclient, on whatever JAX finds: CPU here)
and fail on any error: notebooks/native_api.ipynb (SGLang's native API walk-through, against real
servers of the bundled default model and of tiny checkpoints it builds) and notebooks/offline_engine.ipynb
(the Python `Engine` without HTTP).

Their stored outputs are a clean run's, kept so they read well on GitHub; the tests execute a copy in
memory and never write the files back (`python -m tools.notebooks --save ...` refreshes them).
"""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat")  # the dev extra; a bare runtime install has no Jupyter
from tools.notebooks import REPO, execute  # noqa: E402

NOTEBOOKS = ["native_api.ipynb", "offline_engine.ipynb"]
MAX_STORED_BYTES = 400_000  # outputs stay readable: no giant arrays, one small figure


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def errors(notebook) -> list[str]:
    return [f"{output.ename}: {output.evalue}" for cell in code_cells(notebook) for output in cell.outputs
            if output.output_type == "error"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_outputs_are_one_clean_run(name):
    path = REPO / "notebooks" / name
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.language == "python"
    counts = [cell.execution_count for cell in code_cells(notebook)]
    assert counts == list(range(1, len(counts) + 1)), f"{name}: not one top-to-bottom run ({counts}); " \
        f"refresh it with `python -m tools.notebooks --save notebooks/{name}`"
    assert not errors(notebook)
    assert path.stat().st_size < MAX_STORED_BYTES


def test_native_api_notebook_walks_through_every_route():
    source = "\n".join(cell.source for cell in nbformat.read(REPO / "notebooks" / NOTEBOOKS[0], as_version=4).cells)
    for route in ("/generate", "/get_model_info", "/get_server_info", "/health_generate", "/health", "/flush_cache",
                  "/update_weights_from_disk", "/encode", "/v1/rerank", "/classify",
                  "/start_expert_distribution_record", "/stop_expert_distribution_record",
                  "/dump_expert_distribution_record"):
        assert route in source, route


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name):
    path = REPO / "notebooks" / name
    stored = path.read_bytes()
    notebook = execute(path)  # raises CellExecutionError, with the cell and its traceback, on a failing cell
    assert not errors(notebook)
    assert all(cell.execution_count for cell in code_cells(notebook))
    assert path.read_bytes() == stored, "the test run must not rewrite the stored notebook"
