"""The README's code blocks run as written."""

import pathlib
import re

import jax
import pytest

_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCKS = re.findall(r"```python\n(.*?)```", _README.read_text(), re.S)


def test_readme_has_install_and_test_commands():
  text = _README.read_text()
  assert 'pip install -e ".[dev]"' in text
  assert "python -m pytest" in text


@pytest.mark.parametrize("index", range(len(_BLOCKS)))
def test_readme_block_runs(index):
  namespace: dict = {}
  with jax.numpy_dtype_promotion("standard"):  # what users run with
    exec(compile(_BLOCKS[index], f"README.md block {index}", "exec"), namespace)  # pylint: disable=exec-used
