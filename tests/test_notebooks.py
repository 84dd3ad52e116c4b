"""Every notebook's code cells run in order (a smoke run of the tutorials)."""

import json
import pathlib

import jax
import pytest

_NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", _NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
  cells = json.loads(path.read_text())["cells"]
  namespace: dict = {}
  ran = 0
  # Users run with JAX's default dtype promotion (optax's adam relies on it).
  with jax.numpy_dtype_promotion("standard"):
    for i, cell in enumerate(cells):
      if cell["cell_type"] != "code":
        continue
      exec(compile("".join(cell["source"]), f"{path.name} cell {i}", "exec"), namespace)  # pylint: disable=exec-used
      ran += 1
  assert ran > 0
