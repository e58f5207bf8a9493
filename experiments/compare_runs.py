"""Compares two runs' workdirs step by step: where do they diverge?

  python experiments/compare_runs.py WORKDIR_A WORKDIR_B

Reads each metrics.jsonl and eval.json. Timing fields (seconds/*, wall_s, rollout_tokens_per_s)
are left out: they differ between any two runs. Prints the first step whose metrics differ and
which ones, and whether eval.json is the same; exit status 0 when everything compared is equal.
Used to check that a refactoring changed no number (same machine, same flags and seed) and to
find where two machines' runs part.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import app

TIMING = ("seconds/", "wall_s", "rollout_tokens_per_s")


def _records(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def compare(a: str, b: str) -> tuple[bool, list[str]]:
  """(all equal, report lines) for workdirs a and b."""
  ra, rb = _records(a), _records(b)
  lines, same = [], len(ra) == len(rb)
  if not same:
    lines.append(f"metrics.jsonl: {len(ra)} steps against {len(rb)}")
  first = None
  for x, y in zip(ra, rb):
    keys = sorted((set(x) | set(y)) - {k for k in set(x) | set(y) if k.startswith(TIMING)})
    diff = [k for k in keys if x.get(k) != y.get(k)]
    if diff:
      same = False
      if first is None:
        first = x.get("step")
        lines.append(f"first differing step {first}: " + ", ".join(
            f"{k} {x.get(k)!r} vs {y.get(k)!r}" for k in diff[:6]))
  n = min(len(ra), len(rb))
  if first is None:
    lines.append(f"metrics.jsonl: {n} of {n} steps equal (timing fields left out)")
  ea, eb = (os.path.join(w, "eval.json") for w in (a, b))
  if os.path.exists(ea) and os.path.exists(eb):
    with open(ea) as f, open(eb) as g:
      equal = json.load(f) == json.load(g)
    same &= equal
    lines.append(f"eval.json: {'equal' if equal else 'different'}")
  return same, lines


def main(argv: Sequence[str]) -> None:
  if len(argv) != 3:
    sys.exit("usage: python experiments/compare_runs.py WORKDIR_A WORKDIR_B")
  same, lines = compare(argv[1], argv[2])
  print("\n".join(lines))
  sys.exit(0 if same else 1)


if __name__ == "__main__":
  app.run(main)
