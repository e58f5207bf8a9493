"""One RL step of anytime reasoning, as a handful of functions (DESIGN.md "The data path"):

  multihost.prompt_rows -> anytime.rollout_rows -> scoring.score_rollout -> compute_advantages
    -> packing.pack -> step.train_step (x mini-batches)

`rl_step` strings them together and returns the metrics of the step. Shapes: N prompts, G
thinkings each, R = N * G rows, m budgets, A summaries per cut, T packed slots.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from brpo.core import advantages as adv_lib
from brpo.rollout import anytime as at
from brpo.rollout import sampling
from brpo import rows as rows_lib
from brpo.run import multihost
from brpo.run.config import RLConfig
from brpo.run.scoring import score_rollout
from brpo.train import packing
from brpo.train.step import TrainState
from models.config import ModelConfig
from models.params import for_decoding
from models.tokenizer import Tokenizer


def anytime_spec(rl: RLConfig) -> at.AnytimeConfig:
  """What the rollout of a training step samples (budgets, G, A, S, shared cuts)."""
  return at.AnytimeConfig(budgets=rl.budget_spec.budgets, group_size=rl.group_size,
                          n_summaries=rl.n_summaries, summary_len=rl.summary_len,
                          shared_cuts=rl.shared_cut_summaries)


def response_len(rl: RLConfig, toks: at.AnytimeTokens) -> int:
  """Dr. GRPO's constant (SPEC §7): the slots of a packed row that can hold generated tokens,
  b_m + m * A * (I + S) whatever the batch's own lengths (ragged rows keep it)."""
  n_ins = max(len(toks.insert_running), len(toks.insert_ended))
  spec = rl.budget_spec
  return spec.b_max + spec.m * rl.n_summaries * (n_ins + rl.summary_len)


# ---------------------------------------------------------------------------------------------
# Advantages.


def compute_advantages(rewards: np.ndarray, rl: RLConfig, canonical: np.ndarray,
                       reused: bool = False):
  """Summary rewards [N, G, m, A] -> (thinking advantages [R, m], summary advantages [R, m, A],
  summaries to train [R, m, A] bool).

  Thinking: SPEC §5 on the cut rewards (each budget's mean over its A summaries). Summaries:
  "decoupled" (SPEC §6: the baseline pools the summaries of one cut; with A = 1 the G thinkings
  at the budget) or "grpo" (only the summary at b_m, baseline over the G thinkings).
  canonical: [R, m] the budget whose cut each budget shares. `reused`: the rollout sampled one
  set of A summaries per distinct cut (repeated at the budgets that share it; train them once);
  else every budget has its own (the official layout; all are trained).
  """
  n, g, m, a = rewards.shape
  spec = rl.budget_spec
  cut_rewards = rewards.mean(-1)
  think = adv_lib.thinking_advantages(cut_rewards, np.asarray(spec.probs), rl.thinking_baseline,
                                      rl.lam)
  canon = canonical.reshape(n, g, m)
  distinct = (canon == np.arange(m)) if reused else np.ones((n, g, m), bool)
  if rl.summary_advantage == "decoupled":
    summ = adv_lib.summary_advantages(rewards, None if reused else canon)
    train = np.broadcast_to(distinct[..., None], rewards.shape)
  else:
    # One summary per thinking, the one at b_m (reused: that of its last distinct cut).
    last = canon[:, :, -1] if reused else np.full((n, g), m - 1)
    summ = np.zeros_like(rewards)
    train = np.zeros(rewards.shape, bool)
    adv = adv_lib.grpo_summary_advantages(rewards[:, :, -1, 0])
    nn, gg = np.meshgrid(np.arange(n), np.arange(g), indexing="ij")
    summ[nn, gg, last, 0] = adv
    train[nn, gg, last, 0] = True
  r = n * g
  return (think.reshape(r, m).astype(np.float32), summ.reshape(r, m, a).astype(np.float32),
          train.reshape(r, m, a))


# ---------------------------------------------------------------------------------------------
# The whole step.


@dataclasses.dataclass
class RLContext:
  """Everything an RL step needs besides the state and the prompts (built once per run)."""

  cfg: ModelConfig
  tokenizer: Tokenizer
  toks: at.AnytimeTokens
  rl: RLConfig
  grader: Any  # brpo.grading.Grader
  train_step: Callable
  lr_fn: Callable[[int], float]
  mesh: Any = None
  # Prompts are padded to each batch's bucket (multihost.prompt_bucket) of at most this length
  # (the data set's longest prompt's bucket); None: no cap.
  prompt_length: int | None = None
  logprob_fn: Callable | None = None  # (params, rows) -> log-probs [B, T]: old_logp=recompute

  @property
  def spec(self) -> at.AnytimeConfig:
    return anytime_spec(self.rl)


def _put_rows(x, mesh):
  """Places a [R, ...] array with its rows split over (data, fsdp) when they divide evenly.

  `x` is numpy (the same on every process) or a global array."""
  if mesh is None:
    return x
  return jax.device_put(x, rows_lib.row_sharding(mesh, x.shape[0], x.ndim))


def rl_step(state: TrainState, prompts: Sequence[Sequence[int]], references: Sequence[Any],
            ctx: RLContext) -> tuple[TrainState, dict[str, float]]:
  """One RL step on N prompts: rollout, grading, advantages, packing, PPO updates.

  Returns the new state and a flat dict of metrics (see README "Output files").
  With several processes, every one passes the same prompts and references; each samples and
  grades the rows it holds (ctx.mesh), and all get the same advantages and metrics.
  """
  rl, spec = ctx.rl, ctx.spec
  n, g, m = len(prompts), rl.group_size, len(spec.budgets)
  timings: dict[str, float] = {}
  rng, key_roll, key_shuffle = jax.random.split(state.rng, 3)
  strategy = sampling.make_strategy(rl.temperature, rl.top_p)
  t0 = time.perf_counter()
  prompt, valid = multihost.prompt_rows(prompts, spec.group_size, ctx.toks.pad_id,
                                       multihost.prompt_bucket(prompts, ctx.prompt_length),
                                       ctx.mesh)
  roll_params, roll_cfg = for_decoding(state.params, ctx.cfg)
  ro = at.rollout_rows(roll_params, roll_cfg, prompt, valid, spec, ctx.toks, key_roll,
                       think_strategy=strategy, summary_strategy=strategy, timings=timings,
                       rollout_batch=rl.rollout_batch, compact_every=rl.compact_every,
                       compact_min_rows=rl.compact_min_rows)
  t1 = time.perf_counter()
  refs = [ref for ref in references for _ in range(g)]
  rewards = score_rollout(ro, ctx.tokenizer, ctx.toks, refs, ctx.grader)  # [R, m, A]
  t2 = time.perf_counter()
  canonical = rows_lib.fetch(ro.cuts.canonical)
  think_adv, summ_adv, summ_train = compute_advantages(
      rewards.reshape(n, g, m, -1), rl, canonical, ro.reused)
  # Placed like the rollout's rows (every process holds the same advantages).
  put = (lambda x: _put_rows(x, ctx.mesh)) if ctx.mesh is not None else jnp.asarray
  batch = packing.pack(ro, put(think_adv), put(summ_adv), summary_train=put(summ_train))
  batch = packing.ragged(batch, rl.pack_buckets, ctx.cfg.attention_block)  # step's longest row
  rows_per_mb = rl.mini_batch_prompts * g
  logp_gap = None
  t_old = time.perf_counter()
  if rl.old_logp == "recompute":  # SPEC §7: the trainer's own log-probs before the update.
    batch, logp_gap = recompute_old_logp(state.params, batch, ctx, rows_per_mb)
  timings["old_logp"] = time.perf_counter() - t_old
  # Mini-batches of whole groups, in a fresh order each epoch.
  step_metrics: list[dict[str, Any]] = []
  for epoch in range(rl.ppo_epochs):
    perm = rows_lib.fetch(jax.random.permutation(jax.random.fold_in(key_shuffle, epoch), n))
    order = (perm[:, None] * g + np.arange(g)[None]).reshape(-1)
    for start in range(0, n * g, rows_per_mb):
      idx = order[start:start + rows_per_mb]
      mb = jax.tree.map(lambda x: _put_rows(x[idx], ctx.mesh), batch)
      state, met = ctx.train_step(state, mb)
      step_metrics.append(met)
  step_metrics = rows_lib.fetch(step_metrics)
  t3 = time.perf_counter()
  state = state.replace(step=state.step + 1, rng=rng)
  metrics = _metrics(ro, rewards, think_adv, step_metrics, rl, timings,
                     dict(rollout=t1 - t0, grading=t2 - t1, update=t3 - t2),
                     ctx.lr_fn(int(rows_lib.fetch(state.step)) - 1))
  metrics["packed_width"] = float(batch.tokens.shape[1])  # slots per training row
  if logp_gap is not None:
    metrics["logp_gap_sampler_trainer"] = logp_gap
  return state, metrics


def recompute_old_logp(params, batch: packing.PackedBatch, ctx: RLContext, rows: int):
  """PPO's old log-probs from the training forward pass under `params` (the policy that
  sampled), `rows` at a time, as the official trainer does. Returns (batch with them, mean
  absolute gap to the sampler's log-probs over the trained tokens): in bfloat16 the decode
  numerics and the packed forward differ, and with sampler log-probs the ratio absorbs that.
  """
  if ctx.logprob_fn is None:
    raise ValueError("old_logp='recompute' needs RLContext.logprob_fn "
                     "(brpo.train.step.make_logprob_fn)")
  n = batch.tokens.shape[0]
  parts = [ctx.logprob_fn(params, jax.tree.map(
      lambda x: _put_rows(x[start:start + rows], ctx.mesh), batch)) for start in range(0, n, rows)]
  new = rows_lib.fetch(parts)
  new = np.concatenate(new, axis=0)
  mask, sampler = rows_lib.fetch((batch.loss_mask, batch.old_logp))
  new = np.where(mask, new, 0.0).astype(np.float32)
  gap = float(np.abs(new - sampler)[mask].mean()) if mask.any() else 0.0
  put = (lambda x: _put_rows(x, ctx.mesh)) if ctx.mesh is not None else jnp.asarray
  return batch.replace(old_logp=put(new)), gap


def _metrics(ro, rewards, think_adv, step_metrics, rl: RLConfig, timings, phases, lr):
  """Flat dict of floats for metrics.jsonl."""
  spec = rl.budget_spec
  h = rows_lib.fetch({"tl": ro.thinking_len, "end": ro.thinking_end, "sl": ro.summary_len,
                       "canon": ro.cuts.canonical})
  out: dict[str, float] = {}
  acc = rewards.mean(axis=(0, 2))  # [m]
  for j, b in enumerate(spec.budgets):
    out[f"accuracy@{b}"] = float(acc[j])
    out[f"adv_mean/seg{j + 1}"] = float(think_adv[:, j].mean())
    out[f"adv_std/seg{j + 1}"] = float(think_adv[:, j].std())
  out["anytime_score"] = float(acc.mean())
  out["reward"] = float((rewards.mean(-1) * np.asarray(spec.probs)).sum(-1).mean())
  out["final_accuracy"] = float(acc[-1])
  out["thinking_len"] = float(h["tl"].mean())
  out["frac_think_end"] = float((h["end"] == at.END_THINK).mean())
  out["frac_eos_end"] = float((h["end"] == at.END_EOS).mean())
  for k in step_metrics[0]:
    out[k] = float(np.mean([m_[k] for m_ in step_metrics]))
  out["bad_updates"] = float(sum(1 - m_["finite"] for m_ in step_metrics))
  out.pop("finite", None)
  out["lr"] = float(lr)
  distinct = ((h["canon"] == np.arange(h["canon"].shape[1])) if ro.reused
              else np.ones(h["canon"].shape, bool))
  gen = float(h["tl"].sum() + (h["sl"] * distinct[..., None]).sum())
  out["generated_tokens"] = gen
  out["rollout_tokens_per_s"] = gen / max(phases["rollout"], 1e-9)
  out["seconds/thinking"] = timings.get("thinking", float("nan"))
  out["seconds/summaries"] = timings.get("summaries", float("nan"))
  out["seconds/old_logp"] = timings.get("old_logp", 0.0)  # within seconds/update
  out["seconds/grading"] = phases["grading"]
  out["seconds/update"] = phases["update"]
  out["seconds/step"] = sum(phases.values())
  return out
