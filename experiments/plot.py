"""Plots accuracy against budget for several runs on one figure.

  python experiments/plot.py workdir/tiny/*/eval.json --out=accuracy.png

Each argument is an eval.json (or a workdir holding one); the legend uses the workdir's name.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app, flags

from brpo.run import evaluation

flags.DEFINE_string("out", "accuracy.png", "The PNG to write.")
flags.DEFINE_string("title", "", "Figure title.")
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  paths = argv[1:]
  if not paths:
    sys.exit("plot.py: error: give one or more eval.json files or workdirs")
  results = {}
  for path in paths:
    if os.path.isdir(path):
      path = os.path.join(path, "eval.json")
    try:
      with open(path) as f:
        r = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      sys.exit(f"plot.py: error: {path}: {e}")
    missing = {"budgets", "accuracy", "anytime_score"} - set(r)
    if missing:
      sys.exit(f"plot.py: error: {path}: not an eval.json (missing {', '.join(sorted(missing))})")
    results[os.path.basename(os.path.dirname(os.path.abspath(path)))] = r
  print(evaluation.plot_accuracy(results, FLAGS.out, FLAGS.title))


if __name__ == "__main__":
  app.run(main)
