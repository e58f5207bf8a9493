"""Time per RL step and its phases, GRPO against AR-uniform at equal b_max (the tiny task).

  python -m benchmarks.rl_step [--quick] [--steps N] [--out rl_step.json] [--platform=cpu|gpu|..]
      [--think_to_budget] [any experiment flag, e.g. --b_max=192 --summary_len=24 --remat=full]
      [--run "ar_uniform --pack_buckets=1" --run ar_uniform]   # any two or more runs

The runs default to GRPO and AR-uniform (experiments/configs/{grpo,ar_uniform}.flags); `--run`,
repeated, names others: a flagfile of experiments/configs and flags for that run only. Ratios
are to the first run.

A paper-like thinking-to-summary ratio (8,000-token thinkings against summaries of 128 tokens):
  python -m benchmarks.rl_step --think_to_budget --b_max=1024 --summary_len=16

Both runs start from the same warm-started tiny model (trained into --warmstart_dir if absent)
and use the tiny default's batch sizes; their steps alternate, and the first step of each
(compilation) is not timed. Flags this script does not know are experiment flags
(brpo/run/config.py), applied to the base model and to both runs after their flagfiles (model
and shape: --model, --init, --b_max, --summary_len, ...). The paper reports under 10% overhead
for AR against GRPO. The last line is one JSON object.

The warm-started tiny model ends its thinking after 25-40 tokens whatever b_max, so AR's 16
summaries per thinking dominate its step. `--think_to_budget` takes the `</think>` and
end-of-sequence stops out of the thinking (never out of the summaries): every thinking then runs
to b_max, as long reasoning does at the paper's budgets, and the step's cost has the paper's shape.
The rewards of such a run mean nothing; only its timings are read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import time

from benchmarks.platform import set_platform

set_platform()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from brpo.rollout import anytime as at  # noqa: E402
from brpo.tasks import data as data_lib  # noqa: E402
from brpo.run import rl_step as rl_lib  # noqa: E402
from brpo.train import step as train_lib  # noqa: E402
from brpo.run import runner  # noqa: E402
from brpo.grading import Grader  # noqa: E402
from experiments import gsm_math  # noqa: E402
from models.config import RUNTIME_FIELDS  # noqa: E402

PHASES = ("seconds/thinking", "seconds/summaries", "seconds/grading", "seconds/update",
          "seconds/step")


@dataclasses.dataclass(frozen=True)
class ThinkToBudget(at.AnytimeTokens):
  """Anytime tokens whose thinking stops never match (sampled ids are >= 0): every thinking runs
  to b_max and ends by budget. The summaries still stop at end of sequence."""

  @property
  def thinking_stops(self) -> list[tuple[int, ...]]:
    return [(-2,), (-2,)]  # a `</think>` form and an end of sequence, neither reachable


class Run:
  """One flagfile's RL loop on the shared model; `step()` runs one RL step, returns its metrics."""

  def __init__(self, flagfile: str, steps: int, extra: list[str], model, grader,
               think_to_budget: bool = False):
    ec = gsm_math.config_from_args([f"--flagfile={flagfile}", *extra])
    cfg, params, tokenizer = model
    if ec.model.scan_layers != cfg.scan_layers:
      raise ValueError(f"--run {flagfile}: --scan_layers differs from the shared model's; give it "
                       "to all runs (outside --run)")
    # The shared parameters serve every run; the run's own kernel settings apply.
    cfg = cfg.replace(**{f: getattr(ec.model, f) for f in RUNTIME_FIELDS if f != "scan_layers"})
    rl = ec.rl
    toks = at.AnytimeTokens.from_tokenizer(tokenizer)
    if think_to_budget:
      toks = ThinkToBudget(**dataclasses.asdict(toks))
    examples = data_lib.load_dataset(ec.data.train)
    self.prompts, self.refs, _ = runner.encode_prompts(
        examples, tokenizer, ec.model.template, ec.model.max_prompt_len, "skip", ec.data.train)
    upd = rl.prompts_per_batch // rl.mini_batch_prompts
    opt = train_lib.make_optimizer(ec.optim, steps * upd, cfg)
    self.state = train_lib.init_train_state(jax.tree.map(np.copy, params), opt, 0)
    step = train_lib.make_train_step(cfg, opt, rl, rl_lib.response_len(rl, toks))
    self.it = data_lib.DataIterator(list(range(len(self.prompts))), rl.prompts_per_batch, 0)
    self.ctx = rl_lib.RLContext(cfg=cfg, tokenizer=tokenizer, toks=toks, rl=rl, grader=grader,
                                train_step=step, lr_fn=lambda s: ec.optim.lr,
                                prompt_length=runner._prompt_length(self.prompts))

  def step(self) -> dict[str, float]:
    batch = next(self.it)
    self.state, m = rl_lib.rl_step(self.state, [self.prompts[k] for k in batch],
                                   [self.refs[k] for k in batch], self.ctx)
    return m


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
  out = {k: float(np.mean([r[k] for r in rows])) for k in PHASES}
  out["thinking_len"] = float(np.mean([r["thinking_len"] for r in rows]))
  out["generated_tokens"] = float(np.mean([r["generated_tokens"] for r in rows]))
  out["packed_width"] = float(np.mean([r["packed_width"] for r in rows]))
  return out


def parse_run(spec: str) -> tuple[str, list[str]]:
  """'ar_uniform --pack_buckets=1' -> (experiments/configs/ar_uniform.flags, ['--pack_buckets=1'])."""
  name, *flags = shlex.split(spec)
  return f"experiments/configs/{name}.flags", flags


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--steps", type=int, default=0, help="timed steps per run (default 4; quick 2)")
  ap.add_argument("--warmstart_dir", default="experiments/warmstarts/tiny_arith")
  ap.add_argument("--out", default="")
  ap.add_argument("--think_to_budget", action="store_true",
                  help="thinkings never stop before b_max (a paper-like thinking-to-summary "
                  "ratio; timings only)")
  ap.add_argument("--platform", default="cpu", help="cpu, gpu, tpu or auto (read before jax "
                  "is imported)")
  ap.add_argument("--run", action="append", default=[], help="a run to time: a flagfile name "
                  "of experiments/configs and its own flags, e.g. 'ar_uniform --pack_buckets=1' "
                  "(repeat; default grpo and ar_uniform)")
  args, flags = ap.parse_known_args()
  names = args.run or ["grpo", "ar_uniform"]
  if len(names) < 2:
    ap.error("--run: name at least two runs to compare")
  steps = args.steps or (2 if args.quick else 4)
  base = gsm_math.config_from_args(["--flagfile=experiments/configs/tiny_cpu.flags",
                                    f"--warmstart_dir={args.warmstart_dir}", *flags])
  t = time.time()
  model = runner.load_model(base)
  print(f"model ready in {time.time() - t:.0f} s ({model[0].n_params:,} parameters)")
  extra = [f"--warmstart_dir={args.warmstart_dir}", *flags]
  # The runs' steps alternate (in order on even steps, reversed on odd ones), so that all see
  # the same machine: on a shared 2-core machine whole runs timed one after the other moved the
  # ratio from 1.0 to 1.4 between invocations.
  rows = {name: [] for name in names}
  with Grader(num_workers=1) as grader:
    runs = {}
    for name in names:
      flagfile, own = parse_run(name)
      runs[name] = Run(flagfile, steps, extra + own, model, grader, args.think_to_budget)
    for i in range(steps + 1):
      for name in (names if i % 2 == 0 else names[::-1]):
        m = runs[name].step()
        if i:  # the first step compiles
          rows[name].append(m)
  res = {name: summarize(rows[name]) for name in names}
  first = names[0]
  paired = {name: [a["seconds/step"] / g["seconds/step"] for g, a in zip(rows[first], rows[name])]
            for name in names[1:]}
  print(f"\nRL step on the tiny task, {steps} timed steps each, b_max={base.rl.b_max}, "
        f"summary_len={base.rl.summary_len}"
        + (", thinkings run to b_max" if args.think_to_budget else ""))
  wide = max(10, *(len(n) for n in names))
  print(f"{'run':>{wide}} " + " ".join(f"{p.split('/')[1]:>10}" for p in PHASES)
        + f" {'think_len':>9} {'gen tok':>8} {'width':>6}")
  for name, r in res.items():
    print(f"{name:>{wide}} " + " ".join(f"{r[p]:10.2f}" for p in PHASES)
          + f" {r['thinking_len']:9.1f} {r['generated_tokens']:8.0f} {r['packed_width']:6.0f}")
  for name, ratios in paired.items():
    print(f"{name} over {first}: step {res[name]['seconds/step'] / res[first]['seconds/step']:.2f}"
          f"x (per step pair: {', '.join(f'{r:.2f}' for r in ratios)}), update "
          f"{res[name]['seconds/update'] / res[first]['seconds/update']:.2f}x")
  out = {"runs": names, "step_s": {n: res[n]["seconds/step"] for n in names},
         "update_s": {n: res[n]["seconds/update"] for n in names},
         "step_time_over_first": {n: res[n]["seconds/step"] / res[first]["seconds/step"]
                                  for n in names[1:]},
         "paired_ratios": paired, "b_max": base.rl.b_max, "summary_len": base.rl.summary_len,
         "think_to_budget": args.think_to_budget}
  if names == ["grpo", "ar_uniform"]:
    out["ar_over_grpo_step_time"] = out["step_time_over_first"]["ar_uniform"]
  if args.out:
    with open(args.out, "w") as f:
      json.dump({**out, "phases": res}, f, indent=1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
