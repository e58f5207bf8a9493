"""Evidence at small scale: the seven named runs of SPEC §8 over several seeds, the variance of
the thinking advantage (the paper's Figure 3), and a short run on real data.

  python experiments/ablation.py                 # everything, from scratch (see --help)
  python experiments/ablation.py --report_only   # rewrite docs/RESULTS.md from results/*.json

Every run starts from the same warm-started tiny model (results/warmstart) and gets the same
training budget: the same number of RL steps, prompts and thinkings per step, and b_max, so the
same number of sampled thinking tokens at most; the summaries each method samples on top are
reported (generated tokens). Writes results/ablation.json, results/variance.json,
results/real_data.json, the plots in results/, and docs/RESULTS.md (whose numbers are read from
those files; experiments/ablation_report.py). A run that was already completed in results/runs/
is resumed, not redone.
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

from experiments.ablation_report import ROOT, RUNS, write_report


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
