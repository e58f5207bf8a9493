"""Throughput of the reward grader (brpo.grading.Grader) on GSM8K- and MATH-style summaries.

Half the answers are correct, half perturbed; the in-process `grade()` loop is the baseline.
Run: python -m benchmarks.grader [--n 1000] [--quick] [--workers K] [--out grader.json]
"""

from __future__ import annotations

import argparse
import fractions
import json
import os
import pathlib
import random
import re
import time
from typing import Any

from brpo import grading

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K_FILE = DATA / "gsm8k" / "test.jsonl"
MATH_FILE = DATA / "anytime_eval" / "math.json"


def _summary(answer: str) -> str:
  return grading.SUMMARY_PREFIX + "\\boxed{" + answer + "}"


def _gsm8k_references(n: int, rng: random.Random) -> tuple[list[str], str]:
  """GSM8K solutions ("... #### N"): the test split when present, else generated ones."""
  if GSM8K_FILE.exists():
    rows = [json.loads(line) for line in GSM8K_FILE.read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)]["answer"] for i in range(n)], str(GSM8K_FILE)
  references = []
  for _ in range(n):
    value = rng.choice([rng.randint(1, 999), rng.randint(1000, 99999),
                        round(rng.uniform(0, 500), rng.choice([1, 2]))])
    references.append(f"We compute step by step.\n#### {value}")
  return references, "generated"


def _gsm8k_perturb(gold: str, i: int) -> str:
  """A wrong response for a GSM8K gold: off by one, another decimal, no box, box outside."""
  value = fractions.Fraction(gold.replace(",", ""))
  kind = i % 4
  if kind == 0:
    return _summary(str(value + 1) if value.denominator == 1 else gold + "1")
  if kind == 1:
    return _summary(str(float(value + fractions.Fraction(1, 2))))
  if kind == 2:
    return grading.SUMMARY_PREFIX + "The answer is " + gold + "."
  return grading.SUMMARY_PREFIX + "The answer is " + gold + ".\n\n\\boxed{" + gold + "}"


def _math_references(n: int, rng: random.Random) -> tuple[list[Any], str]:
  """MATH500 answers when present, else generated LaTeX answers of the common shapes."""
  if MATH_FILE.exists():
    rows = json.loads(MATH_FILE.read_text())
    return [rows[i % len(rows)]["answer"] for i in range(n)], str(MATH_FILE)
  shapes = [
      lambda a, b: f"\\frac{{{a}}}{{{b + a}}}",
      lambda a, b: f"{a}\\sqrt{{{b + 1}}}",
      lambda a, b: f"({a}, -{b})",
      lambda a, b: f"[{a}, {a + b})",
      lambda a, b: f"\\{{{a}, {b}\\}}",
      lambda a, b: f"x^2 + {a}x + {b}",
      lambda a, b: f"{a} - {b}i",
      lambda a, b: f"\\frac{{{a}\\pi}}{{{b}}}",
      lambda a, b: f"{a}^\\circ",
      lambda a, b: str(a * b),
  ]
  return [rng.choice(shapes)(rng.randint(1, 50), rng.randint(1, 50)) for _ in range(n)], "generated"


def _math_perturb(gold: str) -> str:
  """A wrong answer of the same shape: the first digit changed, or "+1" where there is none."""
  match = re.search(r"\d", gold)
  if match is None:
    return gold + "+1"
  digit = str((int(match.group()) + 1) % 10)
  return gold[:match.start()] + digit + gold[match.end():]


def _workload(kind: str, n: int, rng: random.Random) -> tuple[list[str], list[Any], list[float],
                                                               str]:
  """n responses (first half correct, second half perturbed), references, expected verdicts."""
  half = n // 2
  if kind == "gsm8k":
    references, source = _gsm8k_references(n, rng)
    golds = [r.rsplit("####", 1)[1].strip() for r in references]
    responses = [_summary(g) for g in golds[:half]]
    responses += [_gsm8k_perturb(g, i) for i, g in enumerate(golds[half:])]
  else:
    references, source = _math_references(n, rng)
    golds = [grading.reference_answer(r) for r in references]
    responses = [_summary(g) for g in golds[:half]] + [_summary(_math_perturb(g))
                                                       for g in golds[half:]]
  expected = [1.0] * half + [0.0] * (n - half)
  return responses, references, expected, source


def _time_pool(responses, references, num_workers, batch_size) -> dict[str, float]:
  with grading.Grader(num_workers=num_workers) as grader:
    started = time.perf_counter()
    grader.start()
    # The pool is started and warm before timing; the first start also brings up the fork server.
    grader.grade_batch([_summary("\\sqrt{4}")], ["2"])
    startup_s = time.perf_counter() - started
    grader.stats.clear()
    scores = []
    started = time.perf_counter()
    for i in range(0, len(responses), batch_size):
      scores.extend(grader.grade_batch(responses[i:i + batch_size],
                                       references[i:i + batch_size]).tolist())
    seconds = time.perf_counter() - started
    stats = dict(grader.stats)
  return {"seconds": seconds, "scores": scores, "startup_s": startup_s,
          "in_process": stats.get("in_process", 0), "pool": stats.get("pool", 0),
          "pool_s": stats.get("pool_ms", 0) / 1000, "timeouts": stats.get("timeouts", 0)}


def _time_in_process(responses, references) -> tuple[float, list[float]]:
  started = time.perf_counter()
  scores = [grading.grade(r, ref) for r, ref in zip(responses, references)]
  return time.perf_counter() - started, scores


def measure_grader(n: int = 1000, num_workers: int | None = None, batch_size: int = 512,
                   baseline: bool = True, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
  """Times the batched grader on n GSM8K-style and n MATH-style responses.

  Args:
    n: responses per set (half correct, half perturbed).
    num_workers: Grader workers (default: the Grader's own default).
    batch_size: responses per grade_batch call (an RL step grades thousands at once).
    baseline: also time the sequential in-process `grading.grade` loop on the same responses.
    seed: for the generated sets used when /work/shared/data is absent.
    verbose: print the table.

  Returns:
    gsm8k_per_s and math_per_s (answers/s through the pool, cache empty, pool already started),
    plus per-set details: accuracy on the correct and perturbed halves, the share decided
    in-process, distinct answers sent to workers and their rate, the baseline rate, the data
    source, the worker count and the pool's start time.
  """
  rng = random.Random(seed)
  workers = num_workers or min(8, os.cpu_count() or 1)
  result: dict[str, Any] = {"n": n, "workers": workers, "batch_size": batch_size}
  rows = []
  for kind in ("gsm8k", "math"):
    responses, references, expected, source = _workload(kind, n, rng)
    pool = _time_pool(responses, references, workers, batch_size)
    half = n // 2
    detail = {
        "source": source,
        "per_s": n / pool["seconds"],
        "correct_half_accuracy": sum(pool["scores"][:half]) / max(1, half),
        "perturbed_half_accuracy": sum(pool["scores"][half:]) / max(1, n - half),
        "in_process_share": pool["in_process"] / n,
        "pool_answers": pool["pool"],
        "pool_answers_per_s": pool["pool"] / pool["pool_s"] if pool["pool_s"] else None,
        "timeouts": pool["timeouts"],
        "startup_s": pool["startup_s"],
        "mismatches": sum(s != e for s, e in zip(pool["scores"], expected)),
    }
    if baseline:
      seconds, scores = _time_in_process(responses, references)
      detail["in_process_loop_per_s"] = n / seconds
      detail["agrees_with_in_process"] = scores == pool["scores"]
    result[f"{kind}_per_s"] = detail["per_s"]
    result[kind] = detail
    rows.append((kind, detail))
  if verbose:
    _print_table(result, rows)
  return result


def _print_table(result: dict[str, Any], rows) -> None:
  print(f"grader throughput, n={result['n']} per set, {result['workers']} workers, "
        f"batches of {result['batch_size']}, {os.cpu_count()} CPUs")
  print(f"{'set':6} {'answers/s':>10} {'loop/s':>9} {'in-proc':>8} {'pool n':>7} "
        f"{'pool/s':>7} {'acc+':>5} {'acc-':>5} {'t/o':>4} {'start s':>7}  source")
  for kind, d in rows:
    loop = d.get("in_process_loop_per_s")
    pool_rate = d["pool_answers_per_s"]
    print(f"{kind:6} {d['per_s']:10.0f} {loop if loop is not None else float('nan'):9.0f} "
          f"{d['in_process_share']:8.2f} {d['pool_answers']:7d} "
          f"{pool_rate if pool_rate is not None else float('nan'):7.1f} "
          f"{d['correct_half_accuracy']:5.2f} {d['perturbed_half_accuracy']:5.2f} "
          f"{d['timeouts']:4d} {d['startup_s']:7.2f}  {d['source']}")
  print("answers/s: Grader.grade_batch; loop/s: sequential in-process grading.grade (baseline); "
        "in-proc: share decided without workers; pool n, pool/s: distinct answers sent to the "
        "workers and their rate; acc+/acc-: accuracy on the correct/perturbed halves.")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=1000, help="responses per set")
  parser.add_argument("--quick", action="store_true", help="n=200")
  parser.add_argument("--workers", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument("--no-baseline", action="store_true")
  parser.add_argument("--out", type=pathlib.Path, default=None, help="write the result as JSON")
  args = parser.parse_args()
  result = measure_grader(n=200 if args.quick else args.n, num_workers=args.workers,
                          batch_size=args.batch_size, baseline=not args.no_baseline)
  if args.out is not None:
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
