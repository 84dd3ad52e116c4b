"""Sharded QAT, calibration and checkpoints on 8 simulated CPU devices, in a subprocess.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX
initialises, so the checks run in their own process
(``tests/integration/_sharding_checks.py``), which asserts:

* NNX and Linen: one jitted QAT step, W4A4 LSQ under data-parallel, FSDP and
  tensor-parallel (Megatron column/row) shardings and W8A8 under tensor
  parallelism, gives the loss and the updated parameters, step sizes
  included, of the single-device step;
  NNX on explicit meshes (tensor parallel on auto ones too), Linen on auto
  ones with the shardings of ``partition_specs``;
* the tensor-parallel step keeps kernels and their per-channel step sizes
  (and the optimizer state's) sharded, and its compiled HLO all-gathers no
  full kernel;
* Keras ``fit`` under ``keras.distribution.DataParallel`` and under
  ``ModelParallel`` (a LayoutMap completed by ``follow_layout_map``) equals one
  device;
* calibration (absmax, minmax, ema, percentile, mse, entropy) on a batch
  sharded over 8 devices, and under ``shard_map`` with ``axis_name``, equals
  one device; calibrate + freeze of an NNX model on an explicit mesh too;
* an orbax checkpoint saved from an 8-device FSDP mesh restores onto a 4x2
  tensor-parallel mesh and onto one device with the same outputs;
* a per-block scale that cannot follow its weight's sharding is an error
  naming the layer, the axis and the mesh axis.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "integration", "_sharding_checks.py")


# One process for every check: the checkpoint check reuses the NNX FSDP model trained by the
# NNX check, and the process's imports and small compilations are paid once.
_CHECKS = ["nnx", "linen", "keras", "calib", "nnxcal", "ckpt", "error"]
_LINES = ("nnx W8A8: tp", "nnx W4A4-LSQ: dp/fsdp/tp", "linen W8A8: tp",
          "linen W4A4-LSQ: dp/fsdp/tp", "keras: fit under DataParallel(8)",
          "calibration: absmax, minmax, ema", "nnx: calibrate + freeze on an explicit 2x4 mesh",
          "checkpoint: FSDP(8) -> TP(4x2)", "errors: a scale that cannot follow")


@pytest.mark.slow
def test_sharded_qat_calibration_checkpoints_on_8_devices():
  env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=8").strip(),
         "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, SCRIPT, *_CHECKS], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=1800)
  tail = (proc.stdout + proc.stderr)[-6000:]
  assert proc.returncode == 0, f"sharding checks failed:\n{tail}"
  assert "SHARDING CHECKS PASSED" in proc.stdout, tail
  for line in _LINES:
    assert line in proc.stdout, f"missing check {line!r}:\n{tail}"
