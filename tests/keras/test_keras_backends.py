"""Runs the Keras tests again on the torch (and TensorFlow, if installed) backend, in subprocesses.

Keras fixes its backend at import, so each backend needs its own process. The
inner runs set JAXQAT_KERAS_INNER=1 so that they do not recurse.
"""

import importlib.util
import os
import re
import subprocess
import sys

import keras
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
INNER = os.environ.get("JAXQAT_KERAS_INNER") == "1"

skip_inner = pytest.mark.skipif(INNER, reason="already inside a per-backend run")

# The files whose outcome depends on the backend: numerics through keras.ops, training with
# fit, calibration through predict, saving, serving. Model-graph conversion and reports
# (test_keras_convert.py, test_real_models.py, test_output_channel.py) run the same Python
# on every backend and are checked on JAX only, to keep the suite's time down.
_BACKEND_FILES = ("test_keras_ops.py", "test_keras_layers.py", "test_keras_training.py",
                  "test_keras_calibrate.py", "test_keras_deep.py", "test_keras_serve.py",
                  "test_keras_rnn.py")
# Checked on JAX only: the issue-9 run of 200 eager fit steps (on the other backends the
# positivity of learned step sizes is checked by test_keras_deep.py's LSQ run) and the
# percentile observer's weight-range tracking (the same keras.ops reductions as absmax and
# minmax, which stay; its histogram is the slowest part of this run).
_JAX_ONLY = ("test_lsq_step_sizes_stay_positive_mlp_16_64_64_4",
             "test_fixed_weights_track_weight_range_until_freeze and percentile")


def _run_backend(backend):
  env = {**os.environ, "KERAS_BACKEND": backend, "JAXQAT_KERAS_INNER": "1",
         "JAXQAT_TEST_XLA_CACHE": "0"}  # the outer run owns (and removes) its XLA cache
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-o", "addopts=", "-k", " and ".join(f"not ({k})" for k in _JAX_ONLY),
         *[os.path.join(HERE, f) for f in _BACKEND_FILES]]
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  tail = (proc.stdout + proc.stderr)[-6000:]
  assert proc.returncode == 0, f"Keras tests failed on the {backend} backend:\n{tail}"
  summary = proc.stdout.strip().splitlines()[-1]
  assert re.search(r"\d+ passed", summary) and not re.search(r"\d+ (failed|error)", summary), tail


@skip_inner
@pytest.mark.skipif(keras.backend.backend() == "torch", reason="this run is the torch run")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_keras_tests_pass_on_torch_backend():
  _run_backend("torch")


@skip_inner
@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="this run is the TF run")
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="TensorFlow is not installed")
def test_keras_tests_pass_on_tensorflow_backend():
  _run_backend("tensorflow")


@skip_inner
def test_import_without_an_installed_backend_is_a_clear_error():
  backend = "tensorflow"
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed: no missing backend to test")
  env = {**os.environ, "KERAS_BACKEND": backend}
  proc = subprocess.run([sys.executable, "-c", "import jaxqat.keras"], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "ImportError: jaxqat.keras: could not import keras with the configured backend " \
         "'tensorflow'" in proc.stderr
  assert "Set KERAS_BACKEND=jax (or torch)" in proc.stderr
