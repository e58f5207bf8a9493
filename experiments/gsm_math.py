"""Anytime-reasoning RL (BRPO) on math data: the researcher's front door.

  python experiments/gsm_math.py --flagfile=experiments/configs/tiny_cpu.flags [--flag=value ...]

Flags are parsed once into the frozen dataclasses of brpo.config and handed to brpo.runner; the
library never reads flags. Every flag can be overridden after the flagfile.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Iterator, NoReturn, Sequence

# Runnable as a script from anywhere: the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from brpo.run import config as C  # noqa: E402

FLAGS = flags.FLAGS

# Model.
flags.DEFINE_string("model", C.ModelSpec.model,
                    "Named config (tiny, smollm2-135m, qwen2.5-1.5b, deepseek-r1-distill-qwen-1.5b,"
                    " qwen2.5-7b) or, with --init=checkpoint, a HF folder or .gguf file.")
flags.DEFINE_string("tokenizer", C.ModelSpec.tokenizer,
                    "SentencePiece .model or tokenizer.json; default: beside the checkpoint.")
flags.DEFINE_enum("init", C.ModelSpec.init, ["warmstart", "random", "checkpoint"],
                  "warmstart: the tiny task's supervised warm start; random; checkpoint: --model "
                  "is a path.")
flags.DEFINE_enum("dtype", C.ModelSpec.dtype, ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_enum("param_dtype", C.ModelSpec.param_dtype, ["float32", "bfloat16"],
                  "Parameter dtype.")
flags.DEFINE_string("template", C.ModelSpec.template, "Prompt template: plain, chatml, r1_distill.")
flags.DEFINE_integer("max_prompt_len", C.ModelSpec.max_prompt_len, "Longest prompt in tokens.")
flags.DEFINE_enum("long_prompts", C.ModelSpec.long_prompts, ["skip", "error"],
                  "What to do with a prompt longer than --max_prompt_len.")
# Data.
flags.DEFINE_string("train_data", C.DataConfig.train,
                    "Training questions: a GSM8K .jsonl, a paper-format .json list, or "
                    "arith:<split>[:n=..,terms=..,digits=..] (the synthetic task).")
flags.DEFINE_string("eval_data", C.DataConfig.eval, "Evaluation questions (same formats).")
flags.DEFINE_integer("eval_size", C.DataConfig.eval_size, "Evaluation questions used (0: all).")
# Budgets and advantages.
flags.DEFINE_list("budgets", [], "Explicit budget support b_1 < ... < b_m (overrides b_max and "
                  "n_budgets).")
flags.DEFINE_integer("b_max", C.RLConfig.b_max, "Largest thinking budget (tokens).")
flags.DEFINE_integer("n_budgets", C.RLConfig.n_budgets, "m: budgets b_j = b_max / m * j.")
flags.DEFINE_enum("prior", C.RLConfig.prior, ["uniform", "linear", "base"], "Budget prior p_B.")
flags.DEFINE_list("prior_weights", [], "Explicit prior weights (sum to 1), instead of --prior.")
flags.DEFINE_integer("n_summaries", C.RLConfig.n_summaries, "A: summaries per cut.")
flags.DEFINE_integer("summary_len", C.RLConfig.summary_len, "S: most tokens per summary.")
flags.DEFINE_enum("thinking_baseline", C.RLConfig.thinking_baseline,
                  ["brpo", "v1only", "v2only", "none"], "Baseline of the thinking advantage.")
flags.DEFINE_enum("summary_advantage", C.RLConfig.summary_advantage, ["decoupled", "grpo"],
                  "decoupled: per-cut baseline over the A summaries; grpo: one summary at b_max, "
                  "group baseline.")
flags.DEFINE_float("lam", C.RLConfig.lam, "lambda of the budget-relative baseline V1.")
# Batches and PPO.
flags.DEFINE_integer("group_size", C.RLConfig.group_size, "G: thinkings per prompt.")
flags.DEFINE_integer("prompts_per_batch", C.RLConfig.prompts_per_batch, "Prompts per rollout.")
flags.DEFINE_integer("mini_batch_prompts", C.RLConfig.mini_batch_prompts,
                     "Prompts per optimizer update.")
flags.DEFINE_integer("ppo_epochs", C.RLConfig.ppo_epochs, "Passes over each rollout batch.")
flags.DEFINE_integer("micro_batches", C.RLConfig.micro_batches,
                     "Gradient accumulation steps per update.")
flags.DEFINE_float("clip_low", C.RLConfig.clip_low, "PPO clip epsilon below 1.")
flags.DEFINE_float("clip_high", C.RLConfig.clip_high, "PPO clip epsilon above 1.")
flags.DEFINE_enum("loss_agg", C.RLConfig.loss_agg, ["dr_grpo", "token_mean",
                                                    "seq_mean_token_mean"], "Loss aggregation.")
flags.DEFINE_float("kl_coef", C.RLConfig.kl_coef, "KL-to-reference coefficient (0: off).")
flags.DEFINE_enum("kl_type", C.RLConfig.kl_type, ["k1", "k3"], "KL estimator.")
flags.DEFINE_float("entropy_coef", C.RLConfig.entropy_coef, "Entropy bonus (0: off).")
flags.DEFINE_float("temperature", C.RLConfig.temperature, "Rollout temperature.")
flags.DEFINE_float("top_p", C.RLConfig.top_p, "Rollout top-p.")
# Optimizer.
flags.DEFINE_float("lr", C.OptimConfig.lr, "AdamW learning rate.")
flags.DEFINE_float("b1", C.OptimConfig.b1, "AdamW beta1.")
flags.DEFINE_float("b2", C.OptimConfig.b2, "AdamW beta2.")
flags.DEFINE_float("weight_decay", C.OptimConfig.weight_decay, "AdamW weight decay.")
flags.DEFINE_float("grad_clip", C.OptimConfig.grad_clip, "Global gradient-norm clip.")
flags.DEFINE_enum("lr_schedule", C.OptimConfig.schedule, ["constant", "cosine", "linear"],
                  "Learning-rate schedule after warmup.")
flags.DEFINE_integer("warmup_steps", C.OptimConfig.warmup_steps, "Linear warmup (updates).")
# Evaluation.
flags.DEFINE_integer("eval_budgets", C.EvalConfig.n_budgets, "K budgets evenly spaced to b_max.")
flags.DEFINE_integer("eval_b_max", C.EvalConfig.b_max, "Largest eval budget (0: --b_max).")
flags.DEFINE_integer("eval_samples", C.EvalConfig.samples, "Thinkings per eval question.")
flags.DEFINE_float("eval_temperature", C.EvalConfig.temperature, "Evaluation temperature.")
flags.DEFINE_float("eval_top_p", C.EvalConfig.top_p, "Evaluation top-p.")
flags.DEFINE_integer("eval_summary_len", C.EvalConfig.summary_len,
                     "Summary length at evaluation (0: --summary_len).")
flags.DEFINE_integer("eval_periodic_size", C.EvalConfig.periodic_size,
                     "Questions used by the evaluations during training (0: all of --eval_size).")
# Run.
flags.DEFINE_string("workdir", C.RunConfig.workdir, "Checkpoints, metrics and plots go here.")
flags.DEFINE_enum("mode", C.RunConfig.mode, ["train", "eval"], "Train (resumes) or evaluate.")
flags.DEFINE_integer("steps", C.RunConfig.steps, "RL steps (rollout batches).")
flags.DEFINE_integer("eval_every", C.RunConfig.eval_every, "Evaluate every N steps (0: at end).")
flags.DEFINE_integer("checkpoint_every", C.RunConfig.checkpoint_every, "Checkpoint every N steps.")
flags.DEFINE_integer("keep_checkpoints", C.RunConfig.keep_checkpoints, "Checkpoints kept.")
flags.DEFINE_integer("seed", C.RunConfig.seed, "Seed of data order, sampling and init.")
flags.DEFINE_list("mesh", [str(x) for x in C.RunConfig.mesh],
                  "Mesh shape data,fsdp,tensor (one entry may be -1: the remaining devices).")
flags.DEFINE_string("warmstart_dir", C.RunConfig.warmstart_dir,
                    "Where the tiny task's warm start is trained or reused.")
flags.DEFINE_integer("warmstart_steps", C.RunConfig.warmstart_steps,
                     "Warm-start SFT steps (0: its default).")
flags.DEFINE_integer("warmstart_seed", C.RunConfig.warmstart_seed,
                     "Seed of the warm start (apart from --seed: seeds share one warm start).")
flags.DEFINE_integer("max_bad_steps", C.RunConfig.max_bad_steps,
                     "Stop after this many consecutive steps with non-finite loss/gradients.")
flags.DEFINE_integer("grader_workers", C.RunConfig.grader_workers, "Grading processes.")
flags.DEFINE_float("grader_timeout_s", C.RunConfig.grader_timeout_s, "Per-answer grading timeout.")
flags.DEFINE_enum("distributed", C.RunConfig.distributed, ["auto", "on", "off"],
                  "jax.distributed.initialize (auto: on TPU pods / with a coordinator set).")
flags.DEFINE_bool("progress", C.RunConfig.progress, "Progress bars.")


def _ints(name: str, values) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f"--{name}={','.join(values)}: expected integers") from None


def _floats(name: str, values) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise ValueError(f"--{name}={','.join(values)}: expected numbers") from None


def config_from_flags(f=FLAGS) -> C.ExperimentConfig:
  """Parses the flags once into the frozen ExperimentConfig (raises ValueError naming a flag)."""
  mesh = _ints("mesh", f.mesh)
  if len(mesh) != 3:
    raise ValueError(f"--mesh={','.join(f.mesh)}: expected 3 sizes (data,fsdp,tensor)")
  return C.ExperimentConfig(
      model=C.ModelSpec(model=f.model, tokenizer=f.tokenizer, init=f.init, dtype=f.dtype,
                        param_dtype=f.param_dtype, template=f.template,
                        max_prompt_len=f.max_prompt_len, long_prompts=f.long_prompts),
      data=C.DataConfig(train=f.train_data, eval=f.eval_data, eval_size=f.eval_size),
      rl=C.RLConfig(
          budgets=_ints("budgets", f.budgets), b_max=f.b_max, n_budgets=f.n_budgets,
          prior=f.prior, prior_weights=_floats("prior_weights", f.prior_weights),
          n_summaries=f.n_summaries, summary_len=f.summary_len,
          thinking_baseline=f.thinking_baseline, summary_advantage=f.summary_advantage,
          lam=f.lam, group_size=f.group_size, prompts_per_batch=f.prompts_per_batch,
          mini_batch_prompts=f.mini_batch_prompts, ppo_epochs=f.ppo_epochs,
          micro_batches=f.micro_batches, clip_low=f.clip_low, clip_high=f.clip_high,
          loss_agg=f.loss_agg, kl_coef=f.kl_coef, kl_type=f.kl_type,
          entropy_coef=f.entropy_coef, temperature=f.temperature, top_p=f.top_p),
      optim=C.OptimConfig(lr=f.lr, b1=f.b1, b2=f.b2, weight_decay=f.weight_decay,
                          grad_clip=f.grad_clip, schedule=f.lr_schedule,
                          warmup_steps=f.warmup_steps),
      eval=C.EvalConfig(n_budgets=f.eval_budgets, b_max=f.eval_b_max, samples=f.eval_samples,
                        temperature=f.eval_temperature, top_p=f.eval_top_p,
                        summary_len=f.eval_summary_len, periodic_size=f.eval_periodic_size),
      run=C.RunConfig(workdir=f.workdir, mode=f.mode, steps=f.steps, eval_every=f.eval_every,
                      checkpoint_every=f.checkpoint_every, keep_checkpoints=f.keep_checkpoints,
                      seed=f.seed, mesh=mesh, warmstart_dir=f.warmstart_dir,
                      warmstart_steps=f.warmstart_steps, warmstart_seed=f.warmstart_seed,
                      max_bad_steps=f.max_bad_steps,
                      grader_workers=f.grader_workers, grader_timeout_s=f.grader_timeout_s,
                      distributed=f.distributed, progress=f.progress))


def _expand_flagfiles(args: Sequence[tuple[str, str]],
                      depth: int = 0) -> Iterator[tuple[str, str]]:
  """(argument, where it came from) pairs -> the same with every --flagfile replaced by its
  lines, each with "path:line" as its origin (as absl reads them: blank and # lines skipped)."""
  for arg, where in args:
    if arg.startswith(("--flagfile=", "-flagfile=")) and depth < 16:
      path = arg.split("=", 1)[1]
      try:
        with open(path) as f:
          lines = f.read().splitlines()
      except OSError:
        yield arg, where
        continue
      yield arg, where
      yield from _expand_flagfiles(
          [(line.strip(), f"{path}:{n}") for n, line in enumerate(lines, start=1)
           if line.strip() and not line.strip().startswith(("#", "//"))], depth + 1)
    else:
      yield arg, where


def _origin(argv: Sequence[str], arg: str) -> str:
  """Where `arg` was first given: "path:line: " inside a flagfile, "" on the command line."""
  want = arg.lstrip("-")
  for given, where in _expand_flagfiles([(a, "") for a in argv[1:]]):
    if given.lstrip("-") == want:
      return f"{where}: " if where else ""
  return ""


def parse_flags(argv: Sequence[str]) -> list[str]:
  """FLAGS(argv), with absl's two-line messages turned into one ValueError line that names the
  flag and, for a flag set in a flagfile, the file and line. Returns the non-flag arguments."""
  try:
    return FLAGS(list(argv))
  except flags.UnrecognizedFlagError as e:
    hint = "--helpfull lists the flags"
    if "Did you mean:" in str(e):
      names = str(e).split("Did you mean:", 1)[1].strip(" ?").split(",")
      hint = "did you mean " + ", ".join(f"--{n.strip()}" for n in names) + "?"
    raise ValueError(f"{_origin(argv, e.flagvalue or e.flagname)}unknown flag --{e.flagname} "
                     f"({hint})") from None
  except flags.CantOpenFlagFileError as e:
    # absl: "ERROR:: Unable to open flagfile: [Errno 2] No such file or directory: 'x.flags'".
    m = re.search(r"\[Errno \d+\] ([^:]+): '(.*)'", str(e))
    if not m:
      raise ValueError(f"--flagfile: {' '.join(str(e).split())}") from None
    reason, path = m.groups()
    hint = ""
    if not os.path.isabs(path):
      hint = (f" (relative to the current directory {os.getcwd()}; run from the repository "
              "root)")
    raise ValueError(f"{_origin(argv, '--flagfile=' + path)}--flagfile={path}: "
                     f"{reason.lower()}{hint}") from None
  except flags.IllegalFlagValueError as e:
    # absl: "flag --steps=abc: invalid literal for int() ..."
    m = re.match(r"flag (--\S+?=[^:]*):", str(e))
    where = _origin(argv, m.group(1)) if m else ""
    raise ValueError(where + " ".join(str(e).split())) from None
  except flags.Error as e:
    raise ValueError(" ".join(str(e).split())) from None


def config_from_args(args: list[str]) -> C.ExperimentConfig:
  """Flags (e.g. ["--flagfile=experiments/configs/grpo.flags", "--steps=2"]) -> config, from the
  defaults (earlier parses are forgotten). For scripts and tests that build several runs.
  Raises ValueError (one line naming the flag, and the flagfile line where it is set)."""
  FLAGS.unparse_flags()
  parse_flags(["gsm_math.py", *args])
  return config_from_flags()


def _fail(message: str) -> NoReturn:
  # One line on stderr, the last one, whatever the message held.
  sys.exit(f"gsm_math.py: error: {' '.join(message.split())}")


def _flags_parser(argv: list[str]) -> list[str]:
  try:
    return parse_flags(argv)
  except ValueError as e:
    _fail(str(e))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]} (flags start with --)")
  try:
    ec = config_from_flags()
  except ValueError as e:
    _fail(str(e))
  from brpo.run import runner

  try:
    runner.main(ec)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    if os.environ.get("BRPO_DEBUG"):
      raise
    _fail(f"{e} (BRPO_DEBUG=1 shows the traceback)")


if __name__ == "__main__":
  app.run(main, flags_parser=_flags_parser)
