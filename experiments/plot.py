"""Plots accuracy against budget for several runs on one figure.

  python experiments/plot.py workdir/tiny/*/eval.json --out=accuracy.png

Each argument is an eval.json (or a workdir holding one); the legend uses the workdir's name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from brpo.run import evaluation  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("evals", nargs="+", help="eval.json files or workdirs")
  ap.add_argument("--out", default="accuracy.png")
  ap.add_argument("--title", default="")
  args = ap.parse_args(argv)
  results = {}
  for path in args.evals:
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
  print(evaluation.plot_accuracy(results, args.out, args.title))


if __name__ == "__main__":
  main()
