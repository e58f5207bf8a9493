"""A real pretrained model learns anytime reasoning: SmolLM2-135M-Instruct, AR-uniform against
GRPO, on 2 CPU cores.

  python experiments/smollm2.py [--seeds=0,1,2] [--steps=40] [--out=results/smollm2]
  python experiments/smollm2.py --extra=--lr=2e-5 --out=results/smollm2_lr2e-5 \
      --workdir=workdir/smollm2_arith_lr2e-5 --start_workdir=workdir/smollm2_arith   # a variant

1. The warm start (once, in <start_workdir>/warmstart): SmolLM2 fine-tuned on the arithmetic task's
   gold traces through its chat template, stopped at its plateau (`--init=warmstart` with a
   checkpoint --model; brpo.tasks.arith.warmstart.PRETRAINED).
2. The step-0 model: that warm start evaluated like the runs' final models (--mode=eval).
3. GRPO (smollm2_135m_arith_grpo.flags) and AR-uniform (smollm2_135m_arith.flags) from that same
   start, the same seeds and steps, each evaluated on the same held-out questions and budgets.
4. SmolLM2 as shipped (--init=checkpoint), evaluated the same way.

Checkpoints stay in --workdir (a 135M model's training state is 1.6 GB); each run's eval.json,
eval_samples.jsonl and metrics.jsonl are copied to <out>/<method>/seed<s>/, with
<out>/summary.json, accuracy.png (accuracy against budget), training.png, warmstart.json and
report.md (the section of docs/RESULTS.md). A completed run is read back, not redone; an
interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Sequence

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"grpo": "experiments/configs/smollm2_135m_arith_grpo.flags",
           "ar_uniform": "experiments/configs/smollm2_135m_arith.flags"}
LABELS = {"start": "step 0 (warm start)", "grpo": "GRPO", "ar_uniform": "AR-uniform"}
COPIED = ("eval.json", "eval_samples.jsonl", "metrics.jsonl")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This script's flags; defined when it runs, so that importing it defines none."""
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each method.")
  flags.DEFINE_list("methods", list(METHODS), "Methods to run, in order.")
  flags.DEFINE_integer("steps", 40, "RL steps per run.")
  flags.DEFINE_string("out", "results/smollm2", "Results folder (relative: to the repository "
                      "root).")
  flags.DEFINE_string("workdir", "workdir/smollm2_arith", "Where the warm start and the runs' "
                      "checkpoints go (relative: to the repository root).")
  flags.DEFINE_list("extra", [], "More flags for every run, e.g. --extra=--eval_size=64.")
  flags.DEFINE_string("start_workdir", None, "Where the warm start and the step-0 and as-shipped "
                      "evaluations are made or found (default: --workdir). A variant, e.g. "
                      "--extra=--lr=2e-5 with its own --out and --workdir, points it at the "
                      "default's workdir to start from the same model.")


@dataclasses.dataclass(frozen=True)
class Args:
  """The flags, folders absolute (relative ones: from the repository root)."""
  out: str
  workdir: str
  steps: int = 40
  extra: tuple[str, ...] = ()
  start_workdir: str = ""  # the warm start's and step-0 evaluations' folder ("": workdir)

  @property
  def start(self) -> str:
    return self.start_workdir or self.workdir

  @classmethod
  def from_flags(cls) -> "Args":
    return cls(out=os.path.join(ROOT, FLAGS.out), workdir=os.path.join(ROOT, FLAGS.workdir),
               steps=FLAGS.steps, extra=tuple(FLAGS.extra),
               start_workdir=os.path.join(ROOT, FLAGS.start_workdir or FLAGS.workdir))


def config(args: Args, flagfile: str, workdir: str, *more: str):
  from brpo.run import flags as flags_lib

  return flags_lib.config_from_args(
      [f"--flagfile={flagfile}", f"--workdir={workdir}",
       f"--warmstart_dir={os.path.join(args.start, 'warmstart')}", "--progress=false",
       *more, *[f"--{e.lstrip('-')}" for e in args.extra]], relative_to=ROOT)


def _read(path: str):
  with open(path) as f:
    return json.load(f)


def _copy(workdir: str, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  for name in COPIED:
    if os.path.exists(os.path.join(workdir, name)):
      shutil.copy(os.path.join(workdir, name), out)


def run_start(args: Args) -> dict:
  """The warm start (made here the first time) evaluated at step 0."""
  from brpo.run import runner

  workdir = os.path.join(args.start, "start")
  done = os.path.join(workdir, "eval.json")
  if not os.path.exists(done):
    runner.main(config(args, METHODS["ar_uniform"], workdir, "--mode=eval"))
  _copy(workdir, os.path.join(args.out, "start"))
  return _read(done)


def run_pretrained(args: Args) -> dict:
  """SmolLM2 as shipped (no warm start), evaluated like the runs: what the task asks of it."""
  from brpo.run import runner

  workdir = os.path.join(args.start, "pretrained")
  done = os.path.join(workdir, "eval.json")
  if not os.path.exists(done):
    runner.main(config(args, METHODS["ar_uniform"], workdir, "--mode=eval", "--init=checkpoint"))
  _copy(workdir, os.path.join(args.out, "pretrained"))
  return _read(done)


def run_one(args: Args, method: str, seed: int) -> dict:
  """One training run to args.steps (resumed if interrupted) -> its final eval.json."""
  from brpo.run import runner

  from brpo.run.config import ExperimentConfig

  workdir = os.path.join(args.workdir, method, f"seed{seed}")
  done = os.path.join(workdir, "eval.json")
  cfg = config(args, METHODS[method], workdir, f"--seed={seed}", f"--steps={args.steps}")
  if os.path.exists(done) and _read(done).get("step") == args.steps:
    # Read back only what these flags would train: a changed flagfile or --extra is refused,
    # as the runner refuses to resume a checkpoint of another config.
    saved = ExperimentConfig.from_dict(_read(os.path.join(workdir, "config.json")))
    if saved.training_signature() != cfg.training_signature():
      diff = runner._signature_diff(saved.training_signature(), cfg.training_signature())
      raise ValueError(f"{workdir}: a finished run of other settings ({diff}); use another "
                       "--workdir or the same flags")
  else:
    runner.main(cfg)
  _copy(workdir, os.path.join(args.out, method, f"seed{seed}"))
  return _read(done)


def _metrics(out: str, method: str, seed: int) -> list[dict]:
  path = os.path.join(out, method, f"seed{seed}", "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if '"loss"' in line]


def summarize(args: Args, start: dict, runs: dict[str, dict[int, dict]],
              seeds: list[int]) -> dict:
  """summary.json: the issue's keys, and mean thinking lengths and step times per method."""
  summary = {"start": {"anytime": start["anytime_score"], "final": start["final_accuracy"],
                       "thinking_tokens": start["mean_thinking_tokens"]},
             "seeds": seeds, "steps": args.steps, "extra": list(args.extra), "step_s": {},
             "flagfile": METHODS["ar_uniform"], "flagfiles": METHODS,
             "budgets": start["budgets"], "n_questions": start["n_questions"]}
  for method, by_seed in runs.items():
    res = [by_seed[s] for s in seeds]
    for seed, r in zip(seeds, res):  # a table compares like with like, or not at all
      for key in ("budgets", "n_questions", "eval_data"):
        if r.get(key) != start.get(key):
          raise ValueError(f"{method} seed {seed} was evaluated with {key}={r.get(key)!r}, the "
                           f"step-0 model with {start.get(key)!r}: --extra changed the "
                           f"evaluation, so give it its own --start_workdir")
    summary[method] = {"anytime": [r["anytime_score"] for r in res],
                       "final": [r["final_accuracy"] for r in res],
                       "thinking_tokens": [r["mean_thinking_tokens"] for r in res],
                       "accuracy": np.mean([r["accuracy"] for r in res], axis=0).tolist()}
    steps = [m["seconds/step"] for s in seeds for m in _metrics(args.out, method, s)]
    summary["step_s"][method] = float(np.median(steps))
  return summary


_STEP = re.compile(r"(-?\d+)([+-])(\d+)=(-?\d+)")  # a running sum of the task's gold traces


def audit_samples(path: str) -> dict:
  """What a run's logged eval samples (eval_samples.jsonl: a few questions at every budget) show
  about its failures, counted over the thinkings that closed before their budget:
  {"closed": n, "restated": thinkings that open by restating the question (`sum 5+7-3`),
   "checked": thinkings with a check line (`check 5+7-3=9`), "wrong_sum": thinkings with a wrong
   running sum before their check line, "unfaithful": summaries whose answer is not the
   thinking's last result, "correct": graded 1}."""
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  closed = [r for r in rows
            if r["thinking"].rstrip().endswith("</think>") and r["thinking_tokens"] < r["budget"]]
  audit = {"closed": len(closed),
           "restated": sum(r["thinking"].lstrip().startswith("sum ") for r in closed),
           "checked": sum("\ncheck " in "\n" + r["thinking"] for r in closed),
           "wrong_sum": 0, "unfaithful": 0, "correct": int(sum(r["grade"] for r in closed))}
  for r in closed:
    sums = _STEP.findall(r["thinking"].split("check")[0])
    audit["wrong_sum"] += any(int(a) + (int(b) if op == "+" else -int(b)) != int(c)
                              for a, op, b, c in sums)
    results = re.findall(r"=(-?\d+)", r["thinking"])
    audit["unfaithful"] += bool(results) and results[-1] != r["extracted_answer"]
  return audit


def audit_table(out: str, methods: Sequence[str], seeds: Sequence[int]) -> str:
  """Markdown, a row per run: steps with no gradient (every group tied), and audit_samples."""
  lines = ["| run | steps without gradient | closed thinkings logged | restating the question "
           "| with a check line | with a wrong running sum | summary off the thinking's result "
           "| graded correct |", "|---|---|---|---|---|---|---|---|"]
  rows = [(LABELS["start"], None, os.path.join(out, "start"))]
  rows += [(f"{LABELS[m]} seed {s}", (m, s), os.path.join(out, m, f"seed{s}"))
           for m in methods for s in seeds]
  for label, run, folder in rows:
    zero = "-" if run is None else sum(x["grad_norm"] == 0 for x in _metrics(out, *run))
    a = audit_samples(os.path.join(folder, "eval_samples.jsonl"))
    lines.append(f"| {label} | {zero} | {a['closed']} | {a['restated']} | {a['checked']} | "
                 f"{a['wrong_sum']} | {a['unfaithful']} | {a['correct']} |")
  return "\n".join(lines)


def table(summary: dict) -> str:
  """Markdown: anytime score, final accuracy, thinking length (mean ± std over seeds)."""
  def cell(values, digits: int = 3) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if v.size > 1 else "")

  lines = ["| model | anytime score | final accuracy | mean thinking tokens | s/step |",
           "|---|---|---|---|---|"]
  s = summary["start"]
  lines.append(f"| {LABELS['start']} | {s['anytime']:.3f} | {s['final']:.3f} | "
               f"{s['thinking_tokens']:.1f} | - |")
  for method in METHODS:
    if method in summary:
      r = summary[method]
      lines.append(f"| {LABELS[method]} ({len(r['anytime'])} seeds) | {cell(r['anytime'])} | "
                   f"{cell(r['final'])} | {cell(r['thinking_tokens'], 1)} | "
                   f"{summary['step_s'][method]:.0f} |")
  return "\n".join(lines)


def report(summary: dict, args: Args) -> str:
  """<out>/report.md, the section of docs/RESULTS.md (experiments/ablation.py includes it): how
  the warm start went, the table, accuracy at a few budgets, and <out>/notes.md (the account
  written by hand after the runs) where it exists. Returns its path."""
  ws_path = os.path.join(args.start, "warmstart", "warmstart.json")
  variant = f", {' '.join(summary['extra'])}" if summary.get("extra") else ""
  lines = [f"## A real model: SmolLM2-135M-Instruct, AR-uniform against GRPO{variant}", "",
           f"`python experiments/smollm2.py --seeds={','.join(map(str, summary['seeds']))} "
           f"--steps={summary['steps']}"
           + "".join(f" --extra={e}" for e in summary.get("extra", []))
           + (f" --start_workdir={os.path.relpath(args.start, ROOT)}"
              if args.start != args.workdir else "")
           + f"`: `{summary['flagfile']}` (AR-uniform) and "
           f"`{summary['flagfiles']['grpo']}` (GRPO) from one warm start, evaluated on "
           f"{summary['n_questions']} held-out questions at {len(summary['budgets'])} budgets "
           f"({summary['budgets'][0]} to {summary['budgets'][-1]} tokens).", ""]
  if os.path.exists(ws_path):
    ws = _read(ws_path)
    checks = ", ".join(f"{a:.3f} at step {s}" for s, a in ws["results"]["checks"])
    lines += [f"Warm start: SmolLM2 fine-tuned on gold traces ({ws['warm_start']['template']} "
              f"template, lr {ws['warm_start']['learning_rate']:g}, batch "
              f"{ws['warm_start']['batch_size']}), {ws['results']['steps_run']} steps in "
              f"{ws['results']['train_seconds'] / 60:.0f} minutes; held-out greedy accuracy at "
              f"{ws['warm_start']['check_budget']} tokens: {checks}.", ""]
  if "pretrained" in summary:
    p = summary["pretrained"]
    lines += [f"SmolLM2 as shipped, evaluated the same way: anytime {p['anytime']:.3f}, final "
              f"{p['final']:.3f}.", ""]
  lines += [table(summary), ""]
  picks = sorted({0, len(summary["budgets"]) // 4, len(summary["budgets"]) // 2,
                  len(summary["budgets"]) - 1})
  lines += ["| accuracy at | " + " | ".join(f"{summary['budgets'][i]} tokens" for i in picks)
            + " |", "|---|" + "---|" * len(picks)]
  rows = [(LABELS["start"], _read(os.path.join(args.out, "start", "eval.json"))["accuracy"])]
  rows += [(LABELS[m], summary[m]["accuracy"]) for m in METHODS if m in summary]
  for label, acc in rows:
    lines.append(f"| {label} | " + " | ".join(f"{acc[i]:.3f}" for i in picks) + " |")
  logged = os.path.join(args.out, "start", "eval_samples.jsonl")
  if os.path.exists(logged):
    with open(logged) as f:
      shown = len({json.loads(line)["question_index"] for line in f})
    lines += ["", f"Each run's logged samples (eval_samples.jsonl: the first {shown} held-out "
              "questions at every budget), the thinkings that closed before their budget "
              "(`experiments/smollm2.py`, `audit_samples`):", "",
              audit_table(args.out, [m for m in METHODS if m in summary], summary["seeds"])]
  docs = os.path.join(ROOT, "docs")  # the images' paths as docs/RESULTS.md, which includes this
  lines += ["", f"![accuracy against budget]({os.path.relpath(args.out, docs)}/accuracy.png)",
            "", f"![training curves]({os.path.relpath(args.out, docs)}/training.png)"]
  notes = os.path.join(args.out, "notes.md")  # written by hand after the runs: what they show
  if os.path.exists(notes):
    with open(notes) as f:
      lines += ["", f.read().strip()]
  path = os.path.join(args.out, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


SMOOTH = 5  # training curves: each point the mean of the last SMOOTH steps (8 thinkings a step)


def _running_mean(values: Sequence[float], k: int) -> np.ndarray:
  """Mean of the last k values at each step (fewer at the start)."""
  c = np.cumsum(np.asarray(values, float))
  n = np.arange(1, len(c) + 1)
  return (c - np.concatenate([np.zeros(k), c[:-k]])[:len(c)]) / np.minimum(n, k)


def plot(summary: dict, seeds: list[int], out: str) -> None:
  """accuracy.png (mean over seeds against budget) and training.png (reward and thinking length
  per step, as running means: a step's 8 thinkings are a noisy estimate)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from brpo.run import evaluation

  curves = {LABELS["start"]: {"budgets": summary["budgets"],
                              "accuracy": _read(os.path.join(out, "start", "eval.json"))[
                                  "accuracy"], "anytime_score": summary["start"]["anytime"]}}
  for method in METHODS:
    if method in summary:
      curves[LABELS[method]] = {"budgets": summary["budgets"],
                                "accuracy": summary[method]["accuracy"],
                                "anytime_score": float(np.mean(summary[method]["anytime"]))}
  evaluation.plot_accuracy(curves, os.path.join(out, "accuracy.png"),
                           f"SmolLM2-135M-Instruct, {summary['n_questions']} held-out questions")
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
  for method in METHODS:
    if method not in summary:
      continue
    for seed in seeds:
      m = _metrics(out, method, seed)
      steps = [x["step"] for x in m]
      kw = dict(label=f"{LABELS[method]} seed {seed}", alpha=0.8,
                color="C1" if method == "ar_uniform" else "C0",
                linestyle=("-", "--", ":", "-.")[seeds.index(seed) % 4])
      for ax, key in zip(axes, ("anytime_score", "thinking_len")):
        ax.plot(steps, _running_mean([x[key] for x in m], SMOOTH), **kw)
  axes[0].set_ylabel(f"training anytime score ({SMOOTH}-step mean)")
  axes[1].set_ylabel(f"mean thinking tokens ({SMOOTH}-step mean)")
  for ax in axes:
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "training.png"))
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  del argv
  unknown = [m for m in FLAGS.methods if m not in METHODS]
  if unknown:
    raise app.UsageError(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)})")
  args = Args.from_flags()
  seeds = [int(s) for s in FLAGS.seeds]
  t = time.time()
  start = run_start(args)
  print(f"step 0: anytime {start['anytime_score']:.3f} final {start['final_accuracy']:.3f} "
        f"({time.time() - t:.0f} s)", flush=True)
  runs: dict[str, dict[int, dict]] = {}
  for seed in seeds:  # seed by seed: an interrupted invocation leaves both methods comparable
    for method in FLAGS.methods:
      t = time.time()
      runs.setdefault(method, {})[seed] = r = run_one(args, method, seed)
      print(f"{method} seed {seed}: anytime {r['anytime_score']:.3f} final "
            f"{r['final_accuracy']:.3f} ({time.time() - t:.0f} s)", flush=True)
  pre = run_pretrained(args)
  summary = summarize(args, start, runs, seeds)
  summary["pretrained"] = {"anytime": pre["anytime_score"], "final": pre["final_accuracy"]}
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  ws = os.path.join(args.start, "warmstart", "warmstart.json")
  if os.path.exists(ws):
    shutil.copy(ws, os.path.join(args.out, "warmstart.json"))
  plot(summary, seeds, args.out)
  report(summary, args)
  print(table(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)
