"""The report of experiments/ablation.py: docs/RESULTS.md and the plots, read from the JSON files
the ablation writes in results/ (so `ablation.py --report_only` rewrites it without running)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

RUNS = ("grpo", "grpo_linear", "grpo_decouple", "grpo_vr", "ar_base", "ar_linear", "ar_uniform")
LABELS = {"grpo": "GRPO", "grpo_linear": "GRPO+linear", "grpo_decouple": "GRPO+decouple",
          "grpo_vr": "GRPO+vr", "ar_base": "AR-base", "ar_linear": "AR-linear",
          "ar_uniform": "AR-uniform"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  # experiments/smollm2.py writes its own section (a real model, AR-uniform against GRPO; a
  # variant of it, e.g. --out=results/smollm2_lr2e-5, one more), and the hand-written notes follow.
  for part in (*sorted(glob.glob(os.path.join(args.out, "smollm2*", "report.md"))),
               os.path.join(os.path.dirname(args.report), "results_notes.md")):
    if os.path.exists(part):
      with open(part) as f:
        L += ["", f.read().strip()]
  os.makedirs(os.path.dirname(args.report), exist_ok=True)
  with open(args.report, "w") as f:
    f.write("\n".join(L) + "\n")
  return args.report
