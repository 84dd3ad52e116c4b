"""QAD vs QAT train-step time on the character-level LM of tests/integration/test_lm_qad.py.

Both steps are jitted once (warm-up excluded); the table gives the median over
``--steps`` timed steps of the W4A8 student: the QAT step (cross-entropy) and
``qnnx.qad_train_step`` (teacher forward + KL). With ``--quality`` it also
runs the whole experiment of the test and prints the held-out bits per
character.

  python benchmarks/bench_qad.py [--steps 30] [--quality]
"""

import argparse
import math
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "integration"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import test_lm_qad as lm  # noqa: E402
from jaxqat.core._distill import QADLoss  # noqa: E402
from jaxqat.flax import nnx as qnnx  # noqa: E402
from jaxqat.flax.nnx._qad import qad_train_step  # noqa: E402


def _median_ms(fn, batches):
  fn(batches[0]).block_until_ready()  # compile
  times = []
  for b in batches[1:]:
    t0 = time.perf_counter()
    fn(b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--quality", action="store_true")
  args = ap.parse_args()
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} ({jax.default_backend()}); load average {os.getloadavg()}")
  teacher = lm.CharLM(nnx.Rngs(0))
  train = lm._text(lm.TRAIN_FILES)  # pylint: disable=protected-access
  batches = [jnp.asarray(b) for b in lm._batches(train, args.steps + 1, seed=0)]  # pylint: disable=protected-access
  student = qnnx.quantize(nnx.clone(teacher), lm._w4a8())  # pylint: disable=protected-access
  qnnx.calibrate(student, [batches[0][:, :-1]])
  rows = []
  for name in ("qat", "qad"):
    s = nnx.clone(student)
    o = nnx.Optimizer(s, optax.adam(1e-4), wrt=nnx.Param)
    if name == "qat":
      fn = lambda b, s=s, o=o: lm._ce_step(s, o, b)  # pylint: disable=protected-access
    else:
      fn = lambda b, s=s, o=o: qad_train_step(teacher, s, o, b[:, :-1],
                                              loss=QADLoss(temperature=2.0))
    rows.append((name, _median_ms(fn, batches)))
  base = rows[0][1]
  print(f"{'step':<6}{'median ms':>12}{'vs QAT':>9}")
  for name, ms in rows:
    print(f"{name:<6}{ms:>12.2f}{ms / base:>9.2f}")
  if args.quality:
    r = lm.run(w8a8=True)
    print({k: (round(v / math.log(2), 4) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
  main()
