"""Frozen configuration of a run: what experiments/gsm_math.py parses its flags into.

Library functions take these dataclasses, never global flags, so a notebook can build them by
hand. Each group mirrors one flag group of the README.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from brpo.core import advantages as adv_lib
from brpo.core import budgets as budgets_lib
from brpo.core import loss as loss_lib
from brpo.rollout import anytime as at
from brpo.tasks import data as data_lib
from models import config as model_configs
from models import tokenizer as tok_lib

SUMMARY_ADVANTAGES = ("decoupled", "grpo")
INITS = ("warmstart", "random", "checkpoint")
OLD_LOGP = ("recompute", "sampler")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Which model: a named config (random init or the tiny warm start), a HF folder or a GGUF."""

  model: str = "tiny"  # a name in models.config.CONFIGS, or a path (HF folder / .gguf file)
  tokenizer: str = ""  # .model / tokenizer.json path; empty: beside the checkpoint
  init: str = "warmstart"  # "warmstart" (tiny task), "random", or "checkpoint" (model is a path)
  dtype: str = "float32"
  param_dtype: str = "float32"
  template: str = "plain"  # models.tokenizer.TEMPLATES
  max_prompt_len: int = 256
  long_prompts: str = "skip"  # "skip" (and count) or "error"

  def __post_init__(self):
    if self.init not in INITS:
      raise ValueError(f"--init={self.init!r}: must be one of {', '.join(INITS)}")
    # Caught here rather than at load time: a warm start would otherwise train first.
    if self.init != "checkpoint" and self.model not in model_configs.CONFIGS:
      raise ValueError(f"--model={self.model!r}: no such named config (known: "
                       f"{', '.join(model_configs.CONFIGS)}); a checkpoint path needs "
                       "--init=checkpoint")
    if self.template not in tok_lib.TEMPLATES:
      raise ValueError(f"--template={self.template!r}: must be one of "
                       f"{', '.join(tok_lib.TEMPLATES)}")
    if self.long_prompts not in ("skip", "error"):
      raise ValueError(f"--long_prompts={self.long_prompts!r}: must be skip or error")
    if self.max_prompt_len < 1:
      raise ValueError(f"--max_prompt_len={self.max_prompt_len}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  train: str = "arith:train"
  eval: str = "arith:test"
  eval_size: int = 128  # questions used for evaluation (0: all)
  on_bad_record: str = "skip"  # skip (count, warn naming file and lines) | error

  def __post_init__(self):
    if self.on_bad_record not in data_lib.BAD_RECORD_POLICIES:
      raise ValueError(f"--on_bad_record={self.on_bad_record!r}: must be one of "
                       f"{', '.join(data_lib.BAD_RECORD_POLICIES)}")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """One RL step: anytime rollout, grading, advantages, PPO update (SPEC §2-§8)."""

  budgets: tuple[int, ...] = ()  # explicit support; else b_max and n_budgets
  b_max: int = 96
  n_budgets: int = 4
  prior: str = "uniform"  # uniform | linear | base
  prior_weights: tuple[float, ...] = ()
  n_summaries: int = 4  # A
  summary_len: int = 16  # S
  thinking_baseline: str = "brpo"  # brpo | v1only | v2only | none
  summary_advantage: str = "decoupled"  # decoupled | grpo
  lam: float = 0.5
  group_size: int = 8  # G
  prompts_per_batch: int = 16  # N prompts per rollout
  mini_batch_prompts: int = 8  # prompts per optimizer step
  ppo_epochs: int = 1
  micro_batches: int = 1  # gradient accumulation inside one optimizer step
  clip_low: float = 0.2
  clip_high: float = 0.2
  loss_agg: str = "dr_grpo"
  kl_coef: float = 0.0
  kl_type: str = "k3"
  entropy_coef: float = 0.0
  temperature: float = 1.0
  top_p: float = 1.0
  shared_cut_summaries: str = "resample"  # resample (official) | reuse
  old_logp: str = "recompute"  # recompute (official: trainer forward) | sampler

  def __post_init__(self):
    checks = [
        (self.shared_cut_summaries in at.SHARED_CUTS, "shared_cut_summaries",
         f"one of {at.SHARED_CUTS}"),
        (self.old_logp in OLD_LOGP, "old_logp", f"one of {OLD_LOGP}"),
        (self.thinking_baseline in adv_lib.BASELINES, "thinking_baseline",
         f"one of {adv_lib.BASELINES}"),
        (self.summary_advantage in SUMMARY_ADVANTAGES, "summary_advantage",
         f"one of {SUMMARY_ADVANTAGES}"),
        (self.loss_agg in loss_lib.AGGREGATIONS, "loss_agg", f"one of {loss_lib.AGGREGATIONS}"),
        (self.kl_type in loss_lib.KL_TYPES, "kl_type", f"one of {loss_lib.KL_TYPES}"),
        (self.group_size >= 1, "group_size", ">= 1"),
        (self.n_summaries >= 1, "n_summaries", ">= 1"),
        (self.summary_len >= 1, "summary_len", ">= 1"),
        (self.prompts_per_batch >= 1, "prompts_per_batch", ">= 1"),
        (self.ppo_epochs >= 1, "ppo_epochs", ">= 1"),
        (self.micro_batches >= 1, "micro_batches", ">= 1"),
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
    if self.group_size == 1 and self.thinking_baseline in ("brpo", "v2only"):
      raise ValueError(f"--group_size=1 with --thinking_baseline={self.thinking_baseline}: the "
                       "group baseline V2 of a single thinking is its own return (advantage 0)")
    if self.group_size == 1 and self.summary_advantage == "grpo":
      raise ValueError("--group_size=1 with --summary_advantage=grpo: the group baseline of one "
                       "summary is itself (advantage 0)")
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

  lr: float = 1e-6
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  schedule: str = "constant"  # constant | cosine | linear
  warmup_steps: int = 0

  def __post_init__(self):
    if self.schedule not in ("constant", "cosine", "linear"):
      raise ValueError(f"--lr_schedule={self.schedule!r}: must be constant, cosine or linear")
    if self.lr <= 0:
      raise ValueError(f"--lr={self.lr}: must be > 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  n_budgets: int = 32  # K budgets evenly spaced up to b_max
  b_max: int = 0  # 0: the training b_max
  samples: int = 1  # thinkings per question
  temperature: float = 0.6
  top_p: float = 1.0
  summary_len: int = 0  # 0: the training summary length
  periodic_size: int = 0  # questions for the evaluations during training (--eval_every); 0: all

  def __post_init__(self):
    # Checked now: these would otherwise fail only at the evaluation after the whole run.
    for flag, value, low in (("eval_budgets", self.n_budgets, 1),
                             ("eval_samples", self.samples, 1), ("eval_b_max", self.b_max, 0),
                             ("eval_summary_len", self.summary_len, 0),
                             ("eval_periodic_size", self.periodic_size, 0)):
      if value < low:
        raise ValueError(f"--{flag}={value}: must be >= {low}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  workdir: str = "workdir/tiny_cpu"
  mode: str = "train"  # train | eval
  steps: int = 40
  eval_every: int = 0  # 0: only at the end
  checkpoint_every: int = 10
  keep_checkpoints: int = 3
  log_every: int = 1
  seed: int = 0
  mesh: tuple[int, int, int] = (1, -1, 1)  # data, fsdp, tensor (-1: the rest)
  warmstart_dir: str = "workdir/warmstart_tiny"
  warmstart_steps: int = 0  # 0: the warm start's default
  warmstart_seed: int = 0  # fixed apart from --seed, so runs of several seeds share one warm start
  max_bad_steps: int = 3  # stop after this many consecutive non-finite updates
  grader_workers: int = 2
  grader_timeout_s: float = 5.0
  distributed: str = "auto"  # auto | on | off: jax.distributed.initialize
  progress: bool = True

  def __post_init__(self):
    if self.mode not in ("train", "eval"):
      raise ValueError(f"--mode={self.mode!r}: must be train or eval")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ModelSpec = ModelSpec()
  data: DataConfig = DataConfig()
  rl: RLConfig = RLConfig()
  optim: OptimConfig = OptimConfig()
  eval: EvalConfig = EvalConfig()
  run: RunConfig = RunConfig()

  def __post_init__(self):
    if self.model.init != "checkpoint":
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
