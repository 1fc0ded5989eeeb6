"""Execute every notebook in notebooks/ top to bottom, so they never rot.

One test per notebook: a fresh `python3` kernel runs each cell in notebooks/ as the working
directory (cell timeout CELL_TIMEOUT seconds); any cell error fails the test with the cell's
traceback. The notebooks check their own results with `assert`s; a few cheap output checks
follow here. Outputs are not written back: the notebooks stay committed without outputs.

The kernel imports llama_jax from this checkout (PYTHONPATH) whether or not the package is
installed. Needs nbclient, nbformat, ipykernel and matplotlib (the test extra).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT = 600

# Text that must appear in a notebook's outputs (cheap checks beyond "no cell raised").
EXPECTED_OUTPUT: dict[str, list[str]] = {
    "01_quickstart": ["finish_reason", "max |logits difference| vs transformers", "wrote ", " cached, first token"],
    "02_tool_calling": ["<|python_tag|>brave_search.call", "final answer:", "models: ['smollm2-demo']"],
    "03_inside_the_model": ["max relative difference", "the model's next token", "KiB/token"],
    "04_kernels": ["max |kernel - reference|", "xla vs pallas"],
    "05_sharding": ["8 devices", "vs tp=1: same tokens: True"],
}
# Notebooks that draw plots, and how many at least.
EXPECTED_IMAGES: dict[str, int] = {"03_inside_the_model": 5}


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    env.pop("XLA_FLAGS", None)  # 05_sharding sets its own device count; others run on one CPU device
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # debugpy's frozen-modules warning on stderr
    return env


def count_images(nb: object) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))  # type: ignore[attr-defined]


def output_text(nb: object) -> str:
    parts = []
    for cell in nb.cells:  # type: ignore[attr-defined]
        for out in cell.get("outputs", []):
            if "text" in out:
                parts.append(out["text"])
            for key in ("text/plain", "text/markdown"):
                if key in out.get("data", {}):
                    parts.append(out["data"][key])
    return "\n".join(parts)


def test_notebooks_are_committed_without_outputs() -> None:
    for path in notebook_paths():
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.perf_counter()
    client.execute(env=kernel_env())  # raises CellExecutionError naming the cell on any error
    print(f"{path.name}: {time.perf_counter() - start:.0f}s")
    text = output_text(nb)
    for expected in EXPECTED_OUTPUT.get(path.stem, []):
        assert expected in text, f"{path.name}: no output contains {expected!r}"
    assert count_images(nb) >= EXPECTED_IMAGES.get(path.stem, 0), f"{path.name}: plots missing"
