"""Evidence at small scale: the seven named runs of SPEC §8 over several seeds, the variance of
the thinking advantage (the paper's Figure 3), and a short run on real data.

  python experiments/ablation.py                 # everything, from scratch (see --help)
  python experiments/ablation.py --report_only   # rewrite docs/RESULTS.md from results/*.json

Every run starts from the same warm-started tiny model (results/warmstart) and gets the same
training budget: the same number of RL steps, prompts and thinkings per step, and b_max, so the
same number of sampled thinking tokens at most; the summaries each method samples on top are
reported (generated tokens). Writes results/ablation.json, results/variance.json,
results/real_data.json, the plots in results/, and docs/RESULTS.md (whose numbers are read from
those files). A run that was already completed in results/runs/ is resumed, not redone.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import types

import numpy as np
from absl import app, flags

RUNS = ("grpo", "grpo_linear", "grpo_decouple", "grpo_vr", "ar_base", "ar_linear", "ar_uniform")
LABELS = {"grpo": "GRPO", "grpo_linear": "GRPO+linear", "grpo_decouple": "GRPO+decouple",
          "grpo_vr": "GRPO+vr", "ar_base": "AR-base", "ar_linear": "AR-linear",
          "ar_uniform": "AR-uniform"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


flags.DEFINE_string("runs", ",".join(RUNS), "Named runs (experiments/configs/<name>.flags).")
flags.DEFINE_string("seeds", "0,1,2", "Seeds of each run.")
flags.DEFINE_integer("steps", 30, "RL steps per run")
flags.DEFINE_string("out", "results", "Results folder (relative: to the repository root).")
flags.DEFINE_string("report", "docs/RESULTS.md", "The report (relative: to the repository root).")
flags.DEFINE_integer("eval_every", 10,
                     "evaluate every N steps (the anytime-score training curve)")
flags.DEFINE_integer("eval_periodic_size", 32,
                     "questions in those evaluations (the final one uses all)")
flags.DEFINE_string("extra", "", "more flags for every run, comma separated")
flags.DEFINE_integer("variance_prompts", 64, "Prompts of the variance batch.")
flags.DEFINE_bool("skip_real", False, "skip the SmolLM2 GSM8K run")
flags.DEFINE_string("parts", "runs,base,variance,real",
                    "which parts to (re)do: runs, base (the warm start evaluated alone), "
                    "variance, real; the others' JSON files are kept as they are")
flags.DEFINE_integer("real_steps", 3, "RL steps of the real-data run.")
flags.DEFINE_string("data_dir", "data", "Data folder of the real-data run (relative: to the "
                    "repository root; experiments/prepare_data.py writes it).")
flags.DEFINE_bool("report_only", False, "Only rewrite the report from the JSON files.")
NAMES = ("runs", "seeds", "steps", "out", "report", "eval_every", "eval_periodic_size", "extra",
         "variance_prompts", "skip_real", "parts", "real_steps", "report_only", "data_dir")


def _args() -> types.SimpleNamespace:
  """The parsed flags, with --out and --report absolute (relative ones: from the repository
  root, wherever the script runs from)."""
  args = types.SimpleNamespace(**{name: flags.FLAGS[name].value for name in NAMES})
  args.out, args.report, args.data_dir = (os.path.join(ROOT, p)
                                         for p in (args.out, args.report, args.data_dir))
  return args


# The settings the recorded results were made with, where tiny_cpu.flags has moved on since: a
# warm start stopped at 0.5 held-out accuracy (RL has room to raise the final accuracy; the
# default now starts from the shipped plateau warm start) and one evaluation sample per question.
RECORDED = ("--warmstart_stop_accuracy=0.5", "--eval_samples=1")


def _config(run_flags: list[str]):
  """A run's ExperimentConfig; its flagfiles (and those they include) read from the root."""
  from brpo.run import flags as flags_lib

  return flags_lib.config_from_args(run_flags, relative_to=ROOT)


def _flags(name: str, seed: int, args) -> list[str]:
  out = args.out
  extra = [f for f in args.extra.split(",") if f]
  return [f"--flagfile=experiments/configs/{name}.flags", f"--seed={seed}",
          f"--workdir={out}/runs/{name}/seed{seed}", f"--warmstart_dir={out}/warmstart",
          *RECORDED,
          f"--steps={args.steps}", f"--eval_every={args.eval_every}",
          f"--eval_periodic_size={args.eval_periodic_size}", "--progress=false", *extra]


def _load_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _write_json(path: str, value) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def _finished(workdir: str, steps: int) -> dict | None:
  """The final evaluation of a run that already completed `steps` steps, else None."""
  path = os.path.join(workdir, "eval.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    res = json.load(f)
  return res if res.get("step") == steps else None


# ---------------------------------------------------------------------------------------------
# 1. The named runs.


def run_ablation(args) -> dict:
  from brpo.run import runner

  runs = args.runs.split(",")
  seeds = [int(s) for s in args.seeds.split(",")]
  total = len(runs) * len(seeds)
  print(f"ablation: {len(runs)} runs x {len(seeds)} seeds = {total} trainings of {args.steps} "
        f"RL steps, each followed by a 32-budget evaluation. On 2 CPU cores one training takes "
        f"about 2-5 minutes (GRPO runs are the cheapest): expect roughly {total * 3.5 / 60:.1f} "
        f"hours; then about 2 minutes for the base and variance parts and 30-50 minutes for the "
        f"SmolLM2 real-data part (3 steps of a 135M model on CPU). Completed runs in "
        f"{args.out}/runs are resumed, not redone.", flush=True)
  results: dict = {}
  started = time.time()
  done = 0
  for name in runs:
    results[name] = {}
    for seed in seeds:
      t = time.time()
      ec = _config(_flags(name, seed, args))
      res = _finished(ec.run.workdir, args.steps)
      if res is None:
        res = runner.main(ec)
      metrics = [m for m in _load_jsonl(os.path.join(ec.run.workdir, "metrics.jsonl"))
                 if "generated_tokens" in m]  # step lines (not the periodic eval lines)
      curve = []
      for step in range(args.eval_every, args.steps, args.eval_every or args.steps):
        with open(os.path.join(ec.run.workdir, f"eval_step{step}.json")) as f:
          e = json.load(f)
        curve.append({"step": step, "anytime_score": e["anytime_score"],
                      "final_accuracy": e["final_accuracy"], "n_questions": e["n_questions"]})
      results[name][str(seed)] = {
          "eval_curve": curve,
          "budgets": res["budgets"], "accuracy": res["accuracy"],
          "anytime_score": res["anytime_score"], "final_accuracy": res["final_accuracy"],
          "mean_thinking_tokens": res["mean_thinking_tokens"],
          "train_curve": [{k: m[k] for k in ("step", "reward", "final_accuracy", "thinking_len",
                                               "generated_tokens") if k in m}
                          for m in metrics],
          "generated_tokens": float(sum(m["generated_tokens"] for m in metrics)),
          "train_seconds": float(sum(m["seconds/step"] for m in metrics)),
      }
      done += 1
      _write_json(os.path.join(args.out, "ablation.json"), results)  # after every run
      eta = (time.time() - started) / done * (total - done)
      print(f"[{done}/{total}] {name} seed {seed}: anytime {res['anytime_score']:.3f} final "
            f"{res['final_accuracy']:.3f} ({time.time() - t:.0f} s; about {eta / 60:.0f} min "
            f"left)", flush=True)
  return results


# ---------------------------------------------------------------------------------------------
# 2. Variance of the thinking advantage (Figure 3), on one batch of warm-start thinkings.


def measure_variance(args) -> dict:
  import jax

  from brpo.core import advantages as adv_lib
  from brpo.rollout import anytime as at
  from brpo.tasks import data as data_lib
  from brpo.run import rl_step, scoring
  from brpo.run import runner
  from brpo.rollout import sampling
  from brpo.grading import Grader

  ec = _config(_flags("ar_uniform", 0, args))
  cfg, params, tokenizer = runner.load_model(ec)
  toks = at.AnytimeTokens.from_tokenizer(tokenizer)
  examples = data_lib.load_dataset(ec.data.eval)[:args.variance_prompts]
  prompts, refs, _ = runner.encode_prompts(examples, tokenizer, ec.model.template,
                                           ec.model.max_prompt_len, "skip", ec.data.eval)
  rl = ec.rl
  spec = rl_step.anytime_spec(rl)
  strategy = sampling.make_strategy(rl.temperature, rl.top_p)
  ro = at.anytime_rollout(params, cfg, prompts, spec, toks, jax.random.PRNGKey(1234),
                          think_strategy=strategy, summary_strategy=strategy,
                          prompt_length=runner._prompt_length(prompts))
  with Grader(num_workers=1) as grader:
    rewards = scoring.score_rollout(ro, tokenizer, toks, [r for r in refs
                                                         for _ in range(rl.group_size)], grader)
  n, g, m = len(prompts), rl.group_size, len(spec.budgets)
  cut = rewards.reshape(n, g, m, -1).mean(-1).astype(np.float64)
  probs = np.asarray(rl.budget_spec.probs, np.float64)
  out = {"budgets": list(spec.budgets), "prior": rl.prior, "n_prompts": n, "group_size": g,
         "n_summaries": rl.n_summaries, "mean_reward_per_budget": cut.mean((0, 1)).tolist(),
         "relative_variance": {}, "corr_with_R": {}}
  returns, _ = adv_lib.returns_and_baselines(cut, probs, "none")
  for mode in ("brpo", "v2only", "v1only"):
    R, V = adv_lib.returns_and_baselines(cut, probs, mode, rl.lam)
    out["relative_variance"][mode] = [float(x) for x in adv_lib.relative_variance(R, V)]
  # Correlations of the two baselines with the return, per segment.
  for mode in ("v1only", "v2only"):
    _, V = adv_lib.returns_and_baselines(cut, probs, mode, rl.lam)
    corr = []
    for s in range(m):
      r_s, v_s = returns[..., s].ravel(), V[..., s].ravel()
      ok = np.std(r_s) > 0 and np.std(v_s) > 0
      corr.append(float(np.corrcoef(r_s, v_s)[0, 1]) if ok else float("nan"))
    out["corr_with_R"]["V1" if mode == "v1only" else "V2"] = corr
  return out


def evaluate_base(args) -> dict:
  """The warm start itself (no RL) under the same evaluation: the runs' common starting point."""
  from brpo.run import runner

  ec = _config(_flags("ar_uniform", 0, args)[:1] + [
      f"--workdir={args.out}/runs/warmstart_eval",
      f"--warmstart_dir={args.out}/warmstart", *RECORDED, "--mode=eval",
      "--progress=false"])
  res = runner.main(ec)
  return {k: res[k] for k in ("budgets", "accuracy", "anytime_score", "final_accuracy",
                              "mean_thinking_tokens", "n_questions")}


# ---------------------------------------------------------------------------------------------
# 3. Real data: SmolLM2-135M-Instruct on GSM8K, a few RL steps.


def real_data(args) -> dict:
  from brpo.run import runner

  data = os.path.join(args.data_dir, "gsm8k")
  if not os.path.isdir(data):
    return {"skipped": f"{data} not found (python experiments/prepare_data.py --datasets=gsm8k)"}
  out = args.out
  ec = _config([
      "--flagfile=experiments/configs/smollm2_135m_gsm8k.flags", f"--data_dir={args.data_dir}",
      f"--workdir={out}/runs/smollm2_gsm8k", f"--steps={args.real_steps}", "--eval_size=16",
      "--progress=false"])
  t = time.time()
  res = runner.main(ec)
  metrics = [m for m in _load_jsonl(os.path.join(ec.run.workdir, "metrics.jsonl"))
             if "generated_tokens" in m]
  return {"config": "experiments/configs/smollm2_135m_gsm8k.flags", "eval": res,
          "steps": [{k: v for k, v in m.items() if k.startswith(("accuracy@", "seconds/"))
                     or k in ("step", "reward", "thinking_len", "frac_think_end",
                              "generated_tokens")} for m in metrics],
          "wall_seconds": time.time() - t}


# ---------------------------------------------------------------------------------------------
# Report.


def _ms(xs) -> str:
  xs = np.asarray(xs, float)
  return f"{100 * xs.mean():.1f} ± {100 * xs.std():.1f}"


def plots(results: dict, variance: dict | None, out: str, base: dict | None = None) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  for name, seeds in results.items():
    acc = np.mean([s["accuracy"] for s in seeds.values()], 0)
    budgets = next(iter(seeds.values()))["budgets"]
    ax.plot(budgets, acc, marker=".", label=f"{LABELS.get(name, name)}")
  if base:
    ax.plot(base["budgets"], base["accuracy"], "k--", label="warm start (no RL)")
  ax.set_xlabel("thinking budget (tokens)")
  ax.set_ylabel("accuracy (mean over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(out, "ablation_accuracy.png"))
  fig.savefig(paths[-1])
  plt.close(fig)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
  for name, seeds in results.items():
    s0 = next(iter(seeds.values()))
    steps = [c["step"] for c in s0["eval_curve"]]
    if steps:
      curve = np.mean([[c["anytime_score"] for c in s["eval_curve"]] for s in seeds.values()], 0)
      axes[0].plot(steps, curve, marker="o", label=LABELS.get(name, name))
    acc = np.mean([[c["final_accuracy"] for c in s["train_curve"]] for s in seeds.values()], 0)
    k = max(1, len(acc) // 8)
    smooth = np.convolve(acc, np.ones(k) / k, mode="valid")
    axes[1].plot(np.arange(len(smooth)) + k, smooth, label=LABELS.get(name, name))
  axes[0].set_xlabel("RL step")
  axes[0].set_ylabel("anytime score (periodic evaluation)")
  axes[1].set_xlabel("RL step")
  axes[1].set_ylabel("training accuracy at b_max (smoothed)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out, "ablation_training.png"))
  fig.savefig(paths[-1])
  plt.close(fig)
  if variance:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    seg = np.arange(1, len(variance["budgets"]) + 1)
    for mode, vals in variance["relative_variance"].items():
      ax.plot(seg, vals, marker="o", label=mode)
    ax.set_xlabel("segment s")
    ax.set_ylabel("Var(R_s - V_s) / Var(R_s)")
    ax.set_xticks(seg)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out, "variance.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
  return paths


def _spreads(results_dir: str) -> dict:
  """The default run's spreads, where their commands have written them: under rounding
  perturbations (experiments/default_spread.py) and over seeds (experiments/default_seeds.py)."""
  out = {}
  for key, name in (("rounding", "default_spread"), ("seeds", "default_seeds")):
    p = os.path.join(results_dir, name, "summary.json")
    if os.path.exists(p):
      with open(p) as f:
        out[key] = json.load(f)
  return out


def _spread_section(spread: dict) -> list[str]:
  if not spread:
    return []
  L = ["", "## How far rounding and seeds move a run", ""]
  if "rounding" in spread:
    r = spread["rounding"]
    L.append(f"The default run (`./run.sh`) under {len(r['runs'])} rounding perturbations "
             f"(`python experiments/default_spread.py`; {', '.join(x['perturbation'] for x in r['runs'])}; "
             f"{r.get('cpu', 'CPU')}): anytime {100 * r['anytime_mean']:.1f} "
             f"({100 * r['anytime_min']:.1f} to {100 * r['anytime_max']:.1f}), final "
             f"{100 * r['final_mean']:.1f} ({100 * r['final_min']:.1f} to "
             f"{100 * r['final_max']:.1f}). \"Beyond\" / \"within\" above compare a difference "
             "with the wider of this range and the seed range below. The ablation's runs start from a warm start stopped at 0.5 "
             "held-out accuracy, on the steep part of its learning curve, where rounding moves "
             "a run further than from the default's plateau warm start: compare them on one "
             "machine.")
  if "seeds" in spread:
    s = spread["seeds"]
    a, f = s["anytime_score"], s["final_accuracy"]
    L += [""] if "rounding" in spread else []
    L.append(f"The default over seeds {', '.join(map(str, s['seeds']))} "
             f"(`python experiments/default_seeds.py`): anytime {100 * a['mean']:.1f} ± "
             f"{100 * a['std']:.1f} ({100 * a['min']:.1f} to {100 * a['max']:.1f}), final "
             f"{100 * f['mean']:.1f} ± {100 * f['std']:.1f} ({100 * f['min']:.1f} to "
             f"{100 * f['max']:.1f}).")
  return L


def write_report(args) -> str:
  out = args.out
  with open(os.path.join(out, "ablation.json")) as f:
    results = json.load(f)
  variance = real = meta = base = None
  p = os.path.join(out, "base.json")
  if os.path.exists(p):
    with open(p) as f:
      base = json.load(f)
  for name in ("variance", "real_data", "meta"):
    p = os.path.join(out, f"{name}.json")
    if os.path.exists(p):
      with open(p) as f:
        val = json.load(f)
      variance, real, meta = (val if name == "variance" else variance,
                              val if name == "real_data" else real,
                              val if name == "meta" else meta)
  plots(results, variance, out, base)
  rel = lambda p: os.path.relpath(p, os.path.dirname(args.report))
  L = ["# Results: anytime reasoning on the tiny task", "",
       "Generated by `python experiments/ablation.py` (rewrite from the JSON files with "
       "`--report_only`); every number below is read from `results/*.json`.", ""]
  if meta and "hardware" in meta:
    L += [f"Hardware: {meta['hardware']}. Seeds: {meta['seeds']}; {meta['steps']} RL steps per "
          "run from one warm start.", "", "| part | command | wall time |", "|---|---|---|"]
    for part, p in sorted(meta.get("parts", {}).items()):
      L.append(f"| {part} | `{p['command']}` | {p['wall_seconds'] / 60:.1f} min |")
    L.append("")
  names = [n for n in RUNS if n in results]
  L += ["## Final accuracy and anytime score (mean ± std over seeds, %)", "",
        "| run | final accuracy | anytime score | mean thinking tokens | generated tokens | seeds |",
        "|---|---|---|---|---|---|"]
  if base:
    L.append(f"| warm start (no RL) | {100 * base['final_accuracy']:.1f} | "
             f"{100 * base['anytime_score']:.1f} | {base['mean_thinking_tokens']:.1f} | 0 | - |")
  for n in names:
    s = list(results[n].values())
    L.append(f"| {LABELS[n]} | {_ms([x['final_accuracy'] for x in s])} | "
             f"{_ms([x['anytime_score'] for x in s])} | "
             f"{np.mean([x['mean_thinking_tokens'] for x in s]):.1f} | "
             f"{np.mean([x['generated_tokens'] for x in s]):,.0f} | {len(s)} |")
  budgets = next(iter(results[names[0]].values()))["budgets"]
  idx = sorted({0, len(budgets) // 4, len(budgets) // 2, 3 * len(budgets) // 4,
                len(budgets) - 1})
  L += ["", "## Accuracy at selected budgets (mean over seeds, %)", "",
        "| run | " + " | ".join(f"b={budgets[i]}" for i in idx) + " |",
        "|---|" + "---|" * len(idx)]
  if base:
    L.append("| warm start (no RL) | " + " | ".join(f"{100 * base['accuracy'][i]:.1f}"
                                                   for i in idx) + " |")
  for n in names:
    acc = np.mean([x["accuracy"] for x in results[n].values()], 0)
    L.append(f"| {LABELS[n]} | " + " | ".join(f"{100 * acc[i]:.1f}" for i in idx) + " |")
  L += ["", f"![accuracy against budget]({rel(os.path.join(out, 'ablation_accuracy.png'))})",
        "", f"![training curves]({rel(os.path.join(out, 'ablation_training.png'))})", ""]
  # Goals.
  def mean_of(n, k):
    return float(np.mean([x[k] for x in results[n].values()])) if n in results else float("nan")

  spread = _spreads(os.path.join(ROOT, "results"))

  def beyond(points: float, key: str) -> str:
    """Whether a difference (points) exceeds how far the default moves that figure: the wider of
    its ranges under rounding perturbations and over seeds."""
    widths = []
    if spread.get("rounding"):
      r = spread["rounding"]
      widths.append((100 * (r[f"{key}_max"] - r[f"{key}_min"]), "rounding"))
    if spread.get("seeds"):
      r = spread["seeds"]["anytime_score" if key == "anytime" else "final_accuracy"]
      widths.append((100 * (r["max"] - r["min"]), "seed"))
    if not widths:
      return ""
    width, what = max(widths)
    return f" ({'beyond' if abs(points) > width else 'within'} the default's {what} range, {width:.1f})"

  L += ["## The paper's claims, checked", ""]
  if "ar_uniform" in results and "grpo" in results:
    d_any = 100 * (mean_of("ar_uniform", "anytime_score") - mean_of("grpo", "anytime_score"))
    d_fin = 100 * (mean_of("ar_uniform", "final_accuracy") - mean_of("grpo", "final_accuracy"))
    L.append(f"- Anytime score, AR-uniform minus GRPO: {d_any:+.1f} points (goal >= +5; the "
             f"paper: +3.0 averaged over five benchmarks){beyond(d_any, 'anytime')}. "
             f"{'Met.' if d_any >= 5 else 'Not met.'}")
    L.append(f"- Final accuracy, AR-uniform minus GRPO: {d_fin:+.1f} points (goal: not lower by "
             f"more than 1){beyond(d_fin, 'final')}. {'Met.' if d_fin >= -1 else 'Not met.'}")
    acc_ar = np.mean([x["accuracy"] for x in results["ar_uniform"].values()], 0)
    acc_g = np.mean([x["accuracy"] for x in results["grpo"].values()], 0)
    L.append(f"- AR-uniform above GRPO at {int((acc_ar > acc_g).sum())} of {len(acc_g)} "
             f"budgets (the paper: at every budget).")
  order = [("grpo", "grpo_linear", "dense reward"), ("grpo", "grpo_decouple", "decoupled summaries"),
           ("grpo", "grpo_vr", "variance reduction"), ("grpo", "ar_base", "vr + decoupling")]
  for a, b, what in order:
    if a in results and b in results:
      d = 100 * (mean_of(b, "anytime_score") - mean_of(a, "anytime_score"))
      f = 100 * (mean_of(b, "final_accuracy") - mean_of(a, "final_accuracy"))
      L.append(f"- {what} ({LABELS[b]} vs {LABELS[a]}): anytime {d:+.1f}"
               f"{beyond(d, 'anytime')}, final {f:+.1f}{beyond(f, 'final')} points.")
  L += _spread_section(spread)
  if variance:
    L += ["", "## Variance of the thinking advantage (Figure 3)", "",
          f"One batch of {variance['n_prompts']} prompts x {variance['group_size']} thinkings "
          f"from the warm start, {variance['n_summaries']} summaries per cut, budgets "
          f"{variance['budgets']}, {variance['prior']} prior. Var(R_s - V_s) / Var(R_s):", "",
          "| baseline | " + " | ".join(f"s={i + 1}" for i in range(len(variance["budgets"])))
          + " |", "|---|" + "---|" * len(variance["budgets"])]
    for mode, vals in variance["relative_variance"].items():
      L.append(f"| {mode} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    for k, vals in variance["corr_with_R"].items():
      L.append(f"| corr({k}, R) | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    b, v2 = variance["relative_variance"]["brpo"], variance["relative_variance"]["v2only"]
    L += ["", f"BRPO below v2only at the last segment: {'yes' if b[-1] < v2[-1] else 'no'} "
          f"({b[-1]:.3f} vs {v2[-1]:.3f}; the paper at 8000 tokens: about 0.34 vs 0.61 on AMC).",
          "", f"![variance]({rel(os.path.join(out, 'variance.png'))})"]
  if real and "skipped" not in real:
    acc_keys = sorted((k for k in real["steps"][0] if k.startswith("accuracy@")),
                      key=lambda k: int(k.split("@")[1]))
    L += ["", "## Real data: SmolLM2-135M-Instruct on GSM8K", "",
          f"`{real['config']}`, {len(real['steps'])} RL steps, wall time "
          f"{real['wall_seconds'] / 60:.1f} minutes.", "",
          "| step | " + " | ".join(acc_keys) + " | thinking tokens | closed </think> | s/step |",
          "|---|" + "---|" * (len(acc_keys) + 3)]
    for s in real["steps"]:
      L.append(f"| {s['step']} | " + " | ".join(f"{s[k]:.3f}" for k in acc_keys)
               + f" | {s['thinking_len']:.0f} | {s['frac_think_end']:.2f} | "
               f"{s['seconds/step']:.0f} |")
    e = real["eval"]
    L += ["", f"Evaluation ({e['n_questions']} questions): anytime score "
          f"{e['anytime_score']:.3f}, final accuracy {e['final_accuracy']:.3f} at budgets "
          f"{e['budgets']}."]
  # experiments/smollm2.py writes its own section (a real model, AR-uniform against GRPO), and
  # the hand-written notes follow.
  for part in (os.path.join(args.out, "smollm2", "report.md"),
               os.path.join(os.path.dirname(args.report), "results_notes.md")):
    if os.path.exists(part):
      with open(part) as f:
        L += ["", f.read().strip()]
  os.makedirs(os.path.dirname(args.report), exist_ok=True)
  with open(args.report, "w") as f:
    f.write("\n".join(L) + "\n")
  return args.report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]} (flags start with --)")
  args = _args()
  os.makedirs(args.out, exist_ok=True)
  parts = set(args.parts.split(","))
  if parts - {"runs", "base", "variance", "real"}:
    raise SystemExit(f"--parts={args.parts}: each must be runs, base, variance or real")
  if args.skip_real:
    parts.discard("real")
  if not args.report_only:
    seconds = {}
    # Each part: the function that does it and the file its result goes to (written atomically).
    jobs = {"runs": (run_ablation, "ablation.json"), "base": (evaluate_base, "base.json"),
            "variance": (measure_variance, "variance.json"), "real": (real_data, "real_data.json")}
    for part, (fn, name) in jobs.items():
      if part in parts:
        t_part = time.time()
        _write_json(os.path.join(args.out, name), fn(args))
        seconds[part] = time.time() - t_part
    meta_path = os.path.join(args.out, "meta.json")
    meta = {}
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        meta = json.load(f)
    command = "python experiments/ablation.py " + " ".join(sys.argv[1:])
    for part in sorted(parts):
      meta.setdefault("parts", {})[part] = {"command": command.strip(),
                                            "wall_seconds": seconds[part]}
    if "runs" in parts:
      meta.update({"hardware": f"{platform.processor() or platform.machine()}, "
                               f"{os.cpu_count()} CPU cores, no accelerator",
                   "command": command.strip(), "wall_seconds": seconds["runs"],
                   "seeds": args.seeds, "steps": args.steps})
    with open(meta_path, "w") as f:
      json.dump(meta, f, indent=1)
  print(write_report(args))


if __name__ == "__main__":
  app.run(main)
