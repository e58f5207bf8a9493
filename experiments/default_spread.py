"""The embedded default run (./run.sh) under rounding perturbations: how far rounding alone moves it.

  python experiments/default_spread.py [--perturbations=avx2_cap,no_cap,ynn_off,ulp_up,ulp_down]
                                       [--out=results/default_spread] [--extra=--steps=20]

One machine, one seed, the same flags; each run changes only how the floating-point arithmetic
rounds:
  avx2_cap   run.sh as it is (XLA:CPU capped at AVX2);
  no_cap     no ISA cap (AVX-512 kernels where the CPU has them; the same as avx2_cap elsewhere);
  ynn_off    the cap, and XLA:CPU's YNNPACK dot fusions off (other matmul kernels);
  ulp_up     the cap, and every initial parameter moved one ulp towards +inf (--init_ulp=1);
  ulp_down   the same towards -inf (--init_ulp=-1);
  avx_cap    XLA:CPU capped at AVX (no FMA: other roundings in XLA's own kernels).
Each is a subprocess (XLA reads its flags once, at start) running experiments/gsm_math.py with
experiments/configs/tiny_cpu.flags into <out>/<name>; a finished run (its eval.json) is read back,
not redone. The warm start is the flagfile's (`--warmstart_dir`): the shipped one a fresh clone
uses. A perturbation that changes no bit on this machine (its training losses and evaluation equal
an earlier run's: no_cap on a CPU without AVX-512, for one) is marked as the same bits.

Prints each run's anytime score and final accuracy, their mean and range, and writes
<out>/summary.json: {"runs": [{"perturbation", "anytime", "final", ...}], "anytime_mean",
"anytime_min", "anytime_max", "final_mean", "final_min", "final_max", ...}. The README's
default-run figure is that mean with that range.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Sequence

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAP = "--xla_cpu_max_isa=AVX2"
# name -> (XLA_FLAGS, --init_ulp)
PERTURBATIONS = {
    "avx2_cap": (CAP, 0),
    "no_cap": ("", 0),
    "ynn_off": (f"{CAP} --xla_cpu_experimental_ynn_fusion_type=", 0),
    "ulp_up": (CAP, 1),
    "ulp_down": (CAP, -1),
    "avx_cap": ("--xla_cpu_max_isa=AVX", 0),
}
FLAGFILE = "experiments/configs/tiny_cpu.flags"

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This script's flags; defined when it runs, so that importing it (the test) defines none."""
  flags.DEFINE_list("perturbations", ["avx2_cap", "no_cap", "ynn_off", "ulp_up", "ulp_down",
                                       "avx_cap"], f"Which runs ({', '.join(PERTURBATIONS)}).")
  flags.DEFINE_string("out", "results/default_spread", "Output folder (relative: to the "
                      "repository root).")
  flags.DEFINE_list("extra", [], "More flags for every run, e.g. --extra=--steps=20.")


def cpu_name() -> str:
  """The CPU's model name and whether it has AVX-512 (XLA:CPU rounds differently with it)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return platform.processor() or platform.machine()
  name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
               if line.startswith("model name")), platform.machine())
  return f"{name}, {'AVX-512' if 'avx512f' in info else 'no AVX-512'}"


def run_one(name: str, out: str, extra: Sequence[str]) -> dict:
  """Runs (or reads back) the default under one perturbation -> its eval.json plus timings."""
  xla_flags, ulp = PERTURBATIONS[name]
  workdir = os.path.join(out, name)
  done = os.path.join(workdir, "eval.json")
  if not os.path.exists(done):
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "gsm_math.py"),
           f"--flagfile={FLAGFILE}", f"--workdir={workdir}", f"--init_ulp={ulp}",
           "--progress=false", *[f"--{e.lstrip('-')}" for e in extra]]
    print(f"[{name}] XLA_FLAGS={xla_flags!r} {' '.join(cmd[2:])}", flush=True)
    t = time.time()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "run.log"), "w") as log:
      rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
      raise SystemExit(f"default_spread.py: error: the {name} run failed (exit {rc}); see "
                       f"{os.path.join(workdir, 'run.log')}")
    with open(os.path.join(workdir, "wall_seconds.txt"), "w") as f:
      f.write(f"{time.time() - t:.0f}\n")
  with open(done) as f:
    result = json.load(f)
  metrics = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics):  # the training's losses: a perturbation may change them alone
    with open(metrics) as f:
      result["train_losses"] = [json.loads(line).get("loss") for line in f if line.strip()]
  wall = os.path.join(workdir, "wall_seconds.txt")
  result["wall_s"] = float(open(wall).read()) if os.path.exists(wall) else None
  return result


def summarize(runs: dict[str, dict], extra: Sequence[str]) -> dict:
  """The summary.json document (see the module docstring)."""
  rows = [{"perturbation": name, "xla_flags": PERTURBATIONS[name][0],
           "init_ulp": PERTURBATIONS[name][1], "anytime": r["anytime_score"],
           "final": r["final_accuracy"], "mean_thinking_tokens": r["mean_thinking_tokens"],
           "wall_s": r["wall_s"]} for name, r in runs.items()]
  # A perturbation that changes no bit here (no_cap on a CPU without AVX-512, or where XLA's
  # kernels round alike) repeats an earlier run: named, so that the spread is read with it.
  seen: dict[str, str] = {}
  for row, r in zip(rows, runs.values()):
    key = json.dumps([r.get("accuracy"), r["mean_thinking_tokens"], r.get("train_losses")])
    row["same_bits_as"] = seen.setdefault(key, row["perturbation"])
    if row["same_bits_as"] == row["perturbation"]:
      del row["same_bits_as"]
  summary: dict = {"runs": rows, "distinct_runs": len(seen)}
  for key in ("anytime", "final"):
    v = np.array([r[key] for r in rows])
    summary.update({f"{key}_mean": float(v.mean()), f"{key}_min": float(v.min()),
                    f"{key}_max": float(v.max()),
                    f"{key}_max_dev": float(np.abs(v - v.mean()).max())})
  summary.update(flagfile=FLAGFILE, extra=list(extra), cpu=cpu_name())
  return summary


def main(argv: Sequence[str]) -> None:
  del argv
  unknown = [p for p in FLAGS.perturbations if p not in PERTURBATIONS]
  if unknown:
    raise SystemExit(f"default_spread.py: error: --perturbations: unknown {unknown} "
                     f"(choose from {', '.join(PERTURBATIONS)})")
  out = os.path.join(ROOT, FLAGS.out)
  runs = {p: run_one(p, out, FLAGS.extra) for p in FLAGS.perturbations}
  summary = summarize(runs, FLAGS.extra)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"{'perturbation':>12} {'anytime':>8} {'final':>7} {'think_len':>9} {'wall_s':>7}")
  for r in summary["runs"]:
    same = f"  (the same bits as {r['same_bits_as']})" if "same_bits_as" in r else ""
    print(f"{r['perturbation']:>12} {r['anytime']:8.3f} {r['final']:7.3f} "
          f"{r['mean_thinking_tokens']:9.1f} {r['wall_s'] or 0:7.0f}{same}")
  for key in ("anytime", "final"):
    print(f"{key}: mean {summary[f'{key}_mean']:.3f}, range {summary[f'{key}_min']:.3f} to "
          f"{summary[f'{key}_max']:.3f} (at most {summary[f'{key}_max_dev']:.3f} from the mean; "
          f"{len(runs)} runs, {summary['distinct_runs']} distinct, on {summary['cpu']})")


if __name__ == "__main__":
  define_flags()
  app.run(main)
