"""Whole tiny runs for the reliability tests: flags, a deterministic stand-in grader, metrics.

As a script it is experiments/gsm_math.py with that grader, for runs in a subprocess:

  python tests/run_helpers.py --flagfile=experiments/configs/tiny_cpu.flags --workdir=...

A 20-step warm start answers nothing right, so the real grader would give every summary 0 and
every gradient would be 0: resume and multi-process checks would then compare runs in which
nothing trains. The stand-in rewards a summary by a hash of its text, which is as deterministic
as the real grader and gives groups mixed rewards.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from typing import Any, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Metrics that measure time, which no two runs share.
WALL_CLOCK = ("seconds/", "tokens_per_s", "wall_s")


class HashGrader:
  """brpo.grading.Grader's interface, rewarding a summary by the parity of its text's CRC-32
  (0 for a thinking that ended with end-of-sequence, as SPEC §4 says)."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def score_batch(self, thinking_texts: Sequence[str], responses: Sequence[str],
                  references: Sequence[Any],
                  thinking_ended_with_eos: Sequence[bool] | None = None) -> np.ndarray:
    eos = thinking_ended_with_eos or [False] * len(responses)
    return np.array([0.0 if e else float(zlib.crc32(f"{t}|{r}|{ref}".encode()) % 2)
                     for t, r, ref, e in zip(thinking_texts, responses, references, eos)],
                    np.float32)

  def close(self):
    pass


def tiny_flags(workdir: str, warmstart_dir: str, *extra: str) -> list[str]:
  """Flags of a small tiny_cpu run: 4 prompts x 2 thinkings per step, 2 updates per step, a
  checkpoint every step, a short final evaluation, on a (1, 4, 2) mesh of 8 devices."""
  return [f"--flagfile={ROOT}/experiments/configs/tiny_cpu.flags", f"--workdir={workdir}",
          f"--warmstart_dir={warmstart_dir}", "--warmstart_steps=20", "--steps=3",
          "--prompts_per_batch=4", "--mini_batch_prompts=2", "--group_size=2", "--b_max=48",
          "--eval_size=8", "--eval_budgets=2", "--checkpoint_every=1", "--keep_checkpoints=10",
          "--mesh=1,4,2", "--progress=false", "--distributed=off", *extra]


HELPER = os.path.abspath(__file__)


def start(workdir: str, warmstart_dir: str, *extra: str, devices: int = 8,
          env: dict[str, str] | None = None) -> "subprocess.Popen":
  """Starts `tiny_flags(workdir, warmstart_dir, *extra)` in a subprocess with `devices` CPU
  devices (and `env` added to its environment)."""
  import subprocess

  # Keep the parent's other XLA flags (run.sh's instruction-set cap), replace the device count.
  xla = [f for f in os.environ.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
  xla.append(f"--xla_force_host_platform_device_count={devices}")
  full_env = {**os.environ, "XLA_FLAGS": " ".join(xla), "JAX_PLATFORMS": "cpu", **(env or {})}
  full_env.pop("BRPO_DEBUG", None)
  return subprocess.Popen([sys.executable, HELPER, *tiny_flags(str(workdir), warmstart_dir,
                                                               *extra)],
                          cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc, expect_rc: int = 0) -> str:
  """Waits for a `start`ed run; checks its exit status and returns its stderr."""
  _, err = proc.communicate(timeout=1200)
  assert proc.returncode == expect_rc, err[-4000:]
  return err


def checkpoint_steps(workdir) -> list[int]:
  """Steps of the complete checkpoints (orbax renames a folder to its step once it is whole)."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def assert_same_run(a: str, b: str, steps: int = 3, rtol: float = 0.0) -> None:
  """Same metrics (but for wall-clock fields), same final evaluation, same parameters.

  rtol=0: bit for bit. Otherwise float metrics and parameters agree to `rtol` while everything
  sampled or counted (tokens, lengths, rewards, accuracies) is still identical: runs whose
  all-reduces sum in another order (several processes) differ only by rounding.
  """
  import jax

  ma, mb = read_metrics(a), read_metrics(b)
  if rtol == 0:
    assert without_wall_clock(ma) == without_wall_clock(mb)
  else:
    assert [sorted(r) for r in ma] == [sorted(r) for r in mb]
    rounding = ("loss", "pg_loss", "grad_norm", "approx_kl_old", "clip_frac", "entropy", "kl")
    for ra, rb in zip(ma, mb):
      for k, v in ra.items():
        if any(w in k for w in WALL_CLOCK):
          continue
        if k in rounding:
          np.testing.assert_allclose(rb[k], v, rtol=rtol, atol=1e-9, err_msg=f"step {ra['step']} {k}")
        elif k == "logp_gap_sampler_trainer":  # itself a rounding gap (~1e-7): compare absolutely
          np.testing.assert_allclose(rb[k], v, atol=1e-5, err_msg=f"step {ra['step']} {k}")
        else:
          assert rb[k] == v or (v != v and rb[k] != rb[k]), (ra["step"], k, v, rb[k])
  with open(os.path.join(a, "eval.json")) as f, open(os.path.join(b, "eval.json")) as g:
    ea, eb = json.load(f), json.load(g)
  for k in ("accuracy", "anytime_score", "final_accuracy", "mean_thinking_tokens"):
    assert ea[k] == eb[k], k
  step_a, pa = restore_params(a)
  step_b, pb = restore_params(b)
  assert step_a == step_b == steps
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    if rtol == 0:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * float(np.abs(x).max()))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def without_wall_clock(records: list[dict[str, Any]]) -> list[str]:
  """Each record as canonical JSON without its timing fields (JSON so that NaN equals NaN)."""
  return [json.dumps({k: v for k, v in r.items() if not any(w in k for w in WALL_CLOCK)},
                     sort_keys=True) for r in records]


def restore_params(workdir: str, step: int | None = None):
  """The params of a run's checkpoint (latest by default), as numpy, with its step."""
  import orbax.checkpoint as ocp

  from brpo.run.checkpointing import Checkpointer

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step() if step is None else step
  import jax

  # Onto one local device, whatever topology saved it (one process or several).
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(os.path.join(ckpt.directory, str(step), "state")).item_metadata
  checkpointer.close()
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), meta)
  state = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]
  ckpt.close()

  return step, jax.tree.map(np.asarray, state["params"])


def main(argv: Sequence[str]) -> None:
  sys.path.insert(0, ROOT)
  import jax

  # As tests/conftest.py sets it, so that subprocess runs equal in-process runs bit for bit.
  jax.config.update("jax_default_matmul_precision", "highest")
  from brpo import grading
  from experiments import gsm_math

  from absl import app

  grading.Grader = HashGrader  # the run system opens its grader as brpo.grading.Grader
  # The command line's own path: one-line errors, exit status 1.
  app.run(gsm_math.main, argv=["gsm_math.py", *argv], flags_parser=gsm_math._flags_parser)


if __name__ == "__main__":
  main(sys.argv[1:])
