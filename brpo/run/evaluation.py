"""Anytime evaluation (SPEC §9): accuracy at K budgets from one thinking per sample cut K ways,
the anytime score (mean over budgets), final accuracy and mean thinking length; a few graded
samples per budget (what was read and why it scored); and the plot.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np
import tqdm
from etils import epath

from brpo.grading import extract
from brpo.rollout import anytime as at
from brpo import rows as rows_lib
from brpo.run import multihost
from brpo import paths
from brpo.run import scoring
from brpo.rollout import sampling
from models.config import ModelConfig
from models.tokenizer import Tokenizer


# Questions shown per budget in <name>_samples.jsonl beside each <name>.json of a run.
EXAMPLES_PER_BUDGET = 3


def eval_budgets(b_max: int, k: int = 32) -> tuple[int, ...]:
  """K budgets evenly spaced up to b_max (b_max/K, 2 b_max/K, ..., b_max), rounded, distinct."""
  if b_max < 1 or k < 1:
    raise ValueError(f"eval budgets need b_max >= 1 and K >= 1, got b_max={b_max}, K={k}")
  return tuple(sorted({max(1, round(b_max * (i + 1) / k)) for i in range(k)}))


def evaluate(params, cfg: ModelConfig, tokenizer: Tokenizer, toks: at.AnytimeTokens,
             prompts: Sequence[Sequence[int]], references: Sequence[Any], *,
             budgets: Sequence[int], samples: int = 1, summary_len: int = 16,
             temperature: float = 0.6, top_p: float = 1.0, grader, rng,
             batch_prompts: int = 32, prompt_length: int | None = None,
             prompt_cap: int | None = None, progress: bool = True,
             mesh=None, examples: int = 0) -> dict[str, Any]:
  """Accuracy against budget from one anytime rollout per (question, sample).

  Every thinking is sampled once up to max(budgets) and cut at every budget; one summary per
  distinct cut. Returns {"budgets", "accuracy", "anytime_score", "final_accuracy",
  "mean_thinking_tokens", "n_questions", "samples"}. With a `mesh`, rollouts are split over
  its batch axes (and over processes: each grades its own rows, all get the result).
  Prompts are padded to `prompt_length`, or, when None, to each batch's own bucket
  (multihost.prompt_bucket, at most `prompt_cap`).
  With `examples` > 0 the result also has "examples": `samples_of_batch` for the first
  `examples` questions this process holds (of the first batch), at every budget.
  """
  if not prompts:
    raise ValueError("evaluation needs at least one question")
  # One summary per distinct cut, shown at every budget that shares it: the same expected
  # accuracy as a fresh sample per budget, at a fraction of the decoding.
  spec = at.AnytimeConfig(budgets=tuple(budgets), group_size=samples, n_summaries=1,
                          shared_cuts="reuse",
                          summary_len=summary_len)
  strategy = sampling.make_strategy(temperature, top_p)
  n = len(prompts)
  bp = min(batch_prompts, n)
  correct = np.zeros(len(budgets))
  think_tokens = 0.0
  count = 0
  bar = tqdm.tqdm(range(0, n, bp), desc="eval", disable=not progress, leave=False)
  for i, start in enumerate(bar):
    idx = list(range(start, min(start + bp, n)))
    keep = len(idx)
    idx += [idx[-1]] * (bp - keep)  # pad the last batch: same shapes, no recompilation
    batch = [prompts[k] for k in idx]
    length = prompt_length or multihost.prompt_bucket(batch, prompt_cap)
    prompt, valid = multihost.prompt_rows(batch, samples, toks.pad_id, length, mesh)
    ro = at.rollout_rows(params, cfg, prompt, valid, spec, toks, jax.random.fold_in(rng, i),
                         think_strategy=strategy, summary_strategy=strategy)
    rows = keep * samples
    refs = [references[k] for k in idx for _ in range(samples)]
    texts = scoring.rollout_texts(ro, tokenizer, toks)  # decoded once: graded, and shown
    rewards = scoring.score_texts(ro, texts, refs, grader)[:rows, :, 0]
    if i == 0 and examples:
      shown = samples_of_batch(ro, texts, rewards, tokenizer, batch, refs, samples, examples)
    correct += rewards.sum(0)
    think_tokens += float(rows_lib.fetch(ro.thinking_len)[:rows].sum())
    count += rows
  acc = correct / count
  result = {"budgets": [int(b) for b in budgets], "accuracy": [float(a) for a in acc],
            "anytime_score": float(acc.mean()), "final_accuracy": float(acc[-1]),
            "mean_thinking_tokens": think_tokens / count, "n_questions": n, "samples": samples}
  if examples:
    result["examples"] = shown
  return result


def samples_of_batch(ro: at.AnytimeRollout, texts, rewards: np.ndarray, tokenizer: Tokenizer,
                     prompts: Sequence[Sequence[int]], references: Sequence[Any], samples: int,
                     n: int) -> list[dict[str, Any]]:
  """What the grader read and what it gave, at every budget, for the first `n` questions of a
  batch whose rows this process holds (first sample, first summary of each).

  texts: `scoring.rollout_texts(ro, ...)` (nothing is decoded again but the n prompts);
  rewards: [rows, m] graded rewards of the batch's real rows (all processes' rows); prompts:
  [rows / samples] token lists; references: [rows], one per row. Returns dicts sorted by budget,
  then question: budget, question (its row's prompt decoded, template included), reference (the
  accepted answers, " | "-joined), thinking_tokens (the cut's length), thinking (the thinking up to
  the cut plus any inserted text up to `</think>`), summary (the marker plus the generated
  summary), extracted_answer (None when the summary boxes none), format_ok (the SPEC §4 gate:
  one `</think>` and no end-of-sequence in the thinking), eos_cut, grade (the reward, 0 or 1).
  """
  first = rows_lib.local_slice(ro.summary_len).start
  canon = rows_lib.local_rows(ro.cuts.canonical)  # [R_local, m]
  length = rows_lib.local_rows(ro.cuts.length)
  budgets = [int(b) for b in rows_lib.fetch(ro.budgets)]
  questions: dict[int, str] = {}  # question index -> its prompt, decoded
  out = []
  for r, j, a, think, response, eos_cut in texts:
    row = first + r
    if a or row >= rewards.shape[0] or row % samples:
      continue
    q = row // samples
    if q not in questions:
      if len(questions) == n:
        continue
      questions[q] = tokenizer.decode(prompts[q])
    shown = {"question": questions[q],
             "reference": " | ".join(extract.reference_answers(references[row])),
             "thinking_tokens": int(length[r, j]), "thinking": think, "summary": response,
             "extracted_answer": extract.extract_answer(response),
             "format_ok": extract.gate(think, response, eos_cut), "eos_cut": eos_cut}
    for k in range(len(budgets)):  # every budget that shares this cut (reused summaries)
      if k == j or (ro.reused and canon[r, k] == j):
        out.append({"budget": budgets[k], "question_index": q, **shown,
                    "grade": float(rewards[row, k])})
  return sorted(out, key=lambda e: (e["budget"], e["question_index"]))


def write_eval(result: dict[str, Any], workdir: str, name: str = "eval") -> str:
  """Writes `result` as <workdir>/<name>.json; its "examples", if any, go one a line to
  <name>_samples.jsonl instead. Returns the JSON's path."""
  result = dict(result)
  examples = result.pop("examples", None)
  path = os.path.join(workdir, f"{name}.json")
  paths.write_text(path, json.dumps(result, indent=1))  # never a half-written eval.json
  if examples is not None:
    paths.write_text(os.path.join(workdir, f"{name}_samples.jsonl"),
                     "".join(json.dumps(e) + "\n" for e in examples))
  return path


def benchmark_table(results: dict[str, dict[str, Any]]) -> str:
  """The paper's Table 1/2 layout: anytime score and final accuracy (%) per benchmark, and
  their average over benchmarks."""
  names = list(results)
  width = max(8, *(len(n) for n in names))
  head = f"{'':<9}" + "".join(f"{n:>{width + 1}}" for n in names) + f"{'Avg':>{width + 1}}"
  lines = [head]
  for label, key in (("anytime", "anytime_score"), ("final", "final_accuracy")):
    vals = [100 * results[n][key] for n in names]
    lines.append(f"{label:<9}" + "".join(f"{v:>{width + 1}.1f}" for v in vals)
                 + f"{sum(vals) / len(vals):>{width + 1}.1f}")
  return "\n".join(lines)


def budget_table(result: dict[str, Any], max_rows: int = 8) -> str:
  """A small text table of accuracy against budget."""
  b, a = result["budgets"], result["accuracy"]
  step = max(1, len(b) // max_rows)
  rows = list(range(step - 1, len(b), step))
  if rows[-1] != len(b) - 1:
    rows.append(len(b) - 1)
  lines = ["budget  accuracy", "------  --------"]
  lines += [f"{b[i]:>6}  {a[i]:8.3f}" for i in rows]
  lines.append(f"anytime score {result['anytime_score']:.3f}, final accuracy "
               f"{result['final_accuracy']:.3f}, mean thinking tokens "
               f"{result['mean_thinking_tokens']:.1f}")
  return "\n".join(lines)


def plot_accuracy(results: dict[str, dict[str, Any]], path: str, title: str = "") -> str:
  """Accuracy against budget, one line per run, written as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for name, r in results.items():
    ax.plot(r["budgets"], r["accuracy"], marker=".", label=f"{name} ({r['anytime_score']:.3f})")
  ax.set_xlabel("thinking budget (tokens)")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(title="run (anytime score)", fontsize=8)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:  # a local file or a gs://... object
    fig.savefig(f, format=os.path.splitext(os.fspath(path))[1][1:].lower() or "png")
  plt.close(fig)
  return path
