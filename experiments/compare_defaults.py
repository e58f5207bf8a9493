"""AR-uniform and GRPO under the previous defaults against the paper's code defaults (issue #14).

  python experiments/ablation.py --runs=ar_uniform,grpo --seeds=0,1,2 --parts=runs \
      --out=results/official_defaults --report=/tmp/unused.md
  python experiments/compare_defaults.py

Reads results/ablation.json (the tiny ablation, summaries reused at shared cuts, sampler
log-probs, eos scored 0 at every cut) and results/official_defaults/ablation.json (the same runs
and seeds under the defaults of the paper's code: resampled shared-cut summaries, recomputed old
log-probs, eos scored 0 only at its own cut) and prints a markdown table of mean ± std over seeds.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("before", "results/ablation.json", "Ablation results, previous defaults.")
flags.DEFINE_string("after", "results/official_defaults/ablation.json",
                    "Ablation results, the paper's code defaults.")
FLAGS = flags.FLAGS
RUNS = {"grpo": "GRPO", "ar_uniform": "AR-uniform"}
KEYS = (("final_accuracy", "final accuracy", 100), ("anytime_score", "anytime score", 100),
        ("mean_thinking_tokens", "thinking tokens", 1), ("generated_tokens", "generated tokens", 1))


def _stat(runs: dict, key: str, scale: float) -> str:
  v = scale * np.array([r[key] for r in runs.values()])
  if scale == 1 and key == "generated_tokens":
    return f"{v.mean():,.0f}"
  return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def table(before: dict, after: dict) -> str:
  lines = ["| run | defaults | seeds | " + " | ".join(k[1] for k in KEYS) + " |",
           "|---|---|---|" + "---|" * len(KEYS)]
  for run, name in RUNS.items():
    for label, res in (("previous (reuse, sampler log-probs)", before),
                       ("the paper's code", after)):
      runs = res.get(run, {})
      if not runs:
        continue
      lines.append(f"| {name} | {label} | {len(runs)} | "
                   + " | ".join(_stat(runs, k, s) for k, _, s in KEYS) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  with open(os.path.join(ROOT, FLAGS.before)) as f, open(os.path.join(ROOT, FLAGS.after)) as g:
    print(table(json.load(f), json.load(g)))


if __name__ == "__main__":
  app.run(main)
