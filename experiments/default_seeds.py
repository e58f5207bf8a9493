"""The embedded default run (./run.sh) over several seeds: how far its numbers move.

  python experiments/default_seeds.py --seeds=0,1,2 [--out=results/default_seeds]

Every seed runs experiments/configs/tiny_cpu.flags with --seed=<s> (the warm start is the shipped
one the flagfile names: --warmstart_seed stays 0) in <out>/seed<s>; a finished seed is read back, not redone. Prints the
anytime score and final accuracy of each seed and their mean, standard deviation and range, and
writes <out>/summary.json. The README's default-run figures come from this command.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import numpy as np
from absl import app, flags

from brpo.run import flags as flags_lib
from brpo.run import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the default run.")
flags.DEFINE_string("out", "results/default_seeds", "Output folder (relative: to the repository "
                    "root).")
flags.DEFINE_list("extra", [], "More flags for every run, e.g. --extra=--steps=20.")
FLAGS = flags.FLAGS
KEYS = ("anytime_score", "final_accuracy", "mean_thinking_tokens")


def run_seed(seed: int, out: str, extra: Sequence[str]) -> dict:
  workdir = os.path.join(out, f"seed{seed}")
  done = os.path.join(workdir, "eval.json")
  if not os.path.exists(done):
    ec = flags_lib.config_from_args(
        ["--flagfile=experiments/configs/tiny_cpu.flags", f"--seed={seed}",
         f"--workdir={workdir}",
         "--progress=false", *[f"--{e.lstrip('-')}" for e in extra]], relative_to=ROOT)
    t = time.time()
    runner.main(ec)
    with open(os.path.join(workdir, "wall_seconds.txt"), "w") as f:
      f.write(f"{time.time() - t:.0f}\n")
  with open(done) as f:
    return json.load(f)


def main(argv: Sequence[str]) -> None:
  del argv
  out = os.path.join(ROOT, FLAGS.out)
  results = {int(s): run_seed(int(s), out, FLAGS.extra) for s in FLAGS.seeds}
  lines = [f"{'seed':>6} {'anytime':>8} {'final':>7} {'think_len':>9}"]
  for s, r in results.items():
    lines.append(f"{s:>6} {r['anytime_score']:8.3f} {r['final_accuracy']:7.3f} "
                 f"{r['mean_thinking_tokens']:9.1f}")
  summary = {"seeds": sorted(results), "flags": FLAGS.extra,
             "per_seed": {str(s): {k: r[k] for k in KEYS} for s, r in results.items()}}
  for k in KEYS:
    v = np.array([r[k] for r in results.values()])
    summary[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                  "min": float(v.min()), "max": float(v.max())}
  for label, k in (("anytime", "anytime_score"), ("final", "final_accuracy")):
    s = summary[k]
    lines.append(f"{label}: {s['mean']:.3f} +- {s['std']:.3f} (range {s['min']:.3f} to "
                 f"{s['max']:.3f}, {len(results)} seeds)")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
