"""Execute the notebooks top to bottom in a real Jupyter kernel, as a reader would.

`python -m tools.notebooks --save notebooks/native_api.ipynb` runs a notebook and stores its outputs
(so it reads well on GitHub); without `--save` it only checks that every cell runs. The tests call
`execute()` and never save, so a test run leaves the committed outputs alone.

The kernel gets this checkout on PYTHONPATH (ahead of any installed copy), so a notebook exercises the
code next to it, and the servers it launches inherit that. The kernel is shut down with SIGKILL to its
process group: on success the notebook has stopped its servers itself, and on a failure that kill is
what stops the servers it left running (they share the kernel's process group).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
CELL_TIMEOUT_S = 600


def execute(path: Path, env: dict[str, str] | None = None, timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """The notebook at `path`, executed in a fresh python3 kernel (cwd: its folder); raises
    nbclient's CellExecutionError, naming the cell, on the first cell that fails."""
    notebook = nbformat.read(path, as_version=4)
    kernel_env = {**os.environ, **(env or {})}
    kernel_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), kernel_env.get("PYTHONPATH")]))
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", shutdown_kernel="immediate",
                            coalesce_streams=True,  # one output per stream, progress bars at their last state
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=kernel_env)
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--save", action="store_true", help="write the outputs back into each notebook")
    args = parser.parse_args()
    for path in args.notebooks:
        notebook = execute(path)
        if args.save:
            nbformat.write(notebook, path)
        print(f"{path}: ran {sum(cell.cell_type == 'code' for cell in notebook.cells)} code cells")


if __name__ == "__main__":
    main()
