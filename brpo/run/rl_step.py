"""One RL step of anytime reasoning, as a handful of functions (DESIGN.md "The data path"):

  anytime_rollout -> score_rollout -> compute_advantages -> packing.pack -> train_step (x mini-batches)

`rl_step` strings them together and returns the metrics of the step. Shapes: N prompts, G
thinkings each, R = N * G rows, m budgets, A summaries per cut, T packed slots.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from brpo.core import advantages as adv_lib
from brpo.rollout import anytime as at
from brpo.core import loss as loss_lib
from brpo.rollout import multihost
from brpo.train import packing
from brpo.rollout import sampling
from brpo.run.config import OptimConfig, RLConfig
from models import decoder as dec
from models import sharding as shd
from models.config import ModelConfig
from models.tokenizer import Tokenizer


@flax.struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: jax.Array  # int32 scalar: RL steps completed
  rng: jax.Array
  ref_params: Any = None  # frozen reference policy, only when the KL term is on


def lr_schedule(oc: OptimConfig, total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer update."""
  total = max(total_steps, 1)
  if oc.schedule == "constant":
    main = optax.constant_schedule(oc.lr)
  elif oc.schedule == "cosine":
    main = optax.cosine_decay_schedule(oc.lr, max(total - oc.warmup_steps, 1), alpha=0.1)
  else:
    main = optax.linear_schedule(oc.lr, 0.0, max(total - oc.warmup_steps, 1))
  if oc.warmup_steps:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, oc.lr, oc.warmup_steps), main], [oc.warmup_steps])
  return main


def make_optimizer(oc: OptimConfig, total_updates: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (SPEC §7)."""
  return optax.chain(
      optax.clip_by_global_norm(oc.grad_clip),
      optax.adamw(lr_schedule(oc, total_updates), b1=oc.b1, b2=oc.b2,
                  weight_decay=oc.weight_decay))


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int,
                     mesh=None, param_axes=None, with_ref: bool = False) -> TrainState:
  """A TrainState whose params (and the optimizer moments) are laid out on `mesh`."""
  if mesh is not None:
    if jax.process_count() > 1:
      # Every process holds the same values; a global layout is made from host copies (arrays
      # committed to one device cannot be placed on other processes' devices).
      params = jax.device_get(params)
    params = shd.shard_tree(params, param_axes, mesh)
    p_shard = jax.tree.map(lambda x: x.sharding, params)
    abstract = jax.eval_shape(optimizer.init, params)
    o_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract, p_shard,
                                    transform_non_params=lambda _: shd.replicated(mesh))
    opt_state = jax.jit(optimizer.init, out_shardings=o_shard)(params)
  else:
    opt_state = optimizer.init(params)
  rep = ((lambda x: jax.device_put(jax.device_get(x), shd.replicated(mesh))) if mesh is not None
         else (lambda x: x))
  return TrainState(params=params, opt_state=opt_state, step=rep(jnp.int32(0)),
                    rng=rep(jax.random.PRNGKey(seed)),
                    ref_params=jax.tree.map(jnp.copy, params) if with_ref else None)


# ---------------------------------------------------------------------------------------------
# Grading.


def rollout_texts(ro: at.AnytimeRollout, tokenizer: Tokenizer, toks: at.AnytimeTokens):
  """Texts to grade for every distinct cut: [(r, j, a, thinking_text, response, eos_ended)].

  thinking_text is the thinking up to the cut plus any inserted text up to `</think>`;
  response is "\\n\\n**Final Answer**\\n" plus the generated summary (without eos).
  Only the rows this process holds (multihost.local_rows; all of them with one process); r
  counts from the first of them.
  """
  h = {k: multihost.local_rows(x) for k, x in (
      ("think", ro.thinking), ("end", ro.thinking_end), ("len", ro.cuts.length),
      ("canon", ro.cuts.canonical), ("ended", ro.cuts.ended), ("summ", ro.summary),
      ("slen", ro.summary_len))}
  r_, m, a_, _ = h["summ"].shape
  marker = at.ANSWER_MARKER
  head_running = tokenizer.decode(toks.insert_running[:len(toks.insert_running)
                                                      - len(toks.insert_ended)])
  out = []
  for r in range(r_):
    eos_ended = bool(h["end"][r] == at.END_EOS)
    for j in range(m):
      if h["canon"][r, j] != j:
        continue
      think = tokenizer.decode(h["think"][r, :h["len"][r, j]])
      if not h["ended"][r, j]:
        think += head_running
      for a in range(a_):
        ids = h["summ"][r, j, a, :h["slen"][r, j, a]]
        if len(ids) and ids[-1] == toks.eos_id:
          ids = ids[:-1]
        out.append((r, j, a, think, marker + tokenizer.decode(ids), eos_ended))
  return out


def score_rollout(ro: at.AnytimeRollout, tokenizer: Tokenizer, toks: at.AnytimeTokens,
                  references: Sequence[Any], grader) -> np.ndarray:
  """Summary rewards [R, m, A] in {0, 1} (SPEC §4); references: [R], one per row.

  Each distinct cut is graded once; budgets that share a cut get its rewards. Each process
  grades the rows it holds, and every process gets all the rewards.
  """
  texts = rollout_texts(ro, tokenizer, toks)
  refs = list(references)[multihost.local_slice(ro.summary_len)]
  scores = grader.score_batch([t[3] for t in texts], [t[4] for t in texts],
                              [refs[t[0]] for t in texts], [t[5] for t in texts])
  canon = multihost.local_rows(ro.cuts.canonical)
  r_, m = canon.shape
  rewards = np.zeros((r_, m, ro.summary_len.shape[2]), np.float32)
  for (r, j, a, *_), s in zip(texts, scores):
    rewards[r, j, a] = s
  rewards = np.take_along_axis(rewards, canon[:, :, None], axis=1)
  return multihost.gather_rows(rewards, ro.summary_len)


# ---------------------------------------------------------------------------------------------
# Advantages.


def compute_advantages(rewards: np.ndarray, rl: RLConfig, canonical: np.ndarray):
  """Summary rewards [N, G, m, A] -> (thinking advantages [R, m], summary advantages [R, m, A],
  summaries to train [R, m, A] bool).

  Thinking: SPEC §5 on the cut rewards (mean over A). Summaries: "decoupled" (SPEC §6, every
  distinct cut) or "grpo" (only the summary at b_m, baseline over the G thinkings).
  """
  n, g, m, a = rewards.shape
  spec = rl.budget_spec
  cut_rewards = rewards.mean(-1)
  think = adv_lib.thinking_advantages(cut_rewards, np.asarray(spec.probs), rl.thinking_baseline,
                                      rl.lam)
  distinct = (canonical == np.arange(m)).reshape(n, g, m)
  if rl.summary_advantage == "decoupled":
    summ = adv_lib.summary_advantages(rewards)
    train = np.broadcast_to(distinct[..., None], rewards.shape)
  else:
    # One summary per thinking, the one at b_m: that of its last distinct cut.
    last = canonical[:, -1].reshape(n, g)
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
# The update.


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, rl: RLConfig,
                    response_len: int, state_sharding=None, batch_sharding=None,
                    metric_sharding=None) -> Callable:
  """A jitted `train_step(state, batch) -> (state, metrics)` for one optimizer update.

  The batch (rows [B, T]) is split into `rl.micro_batches` micro-batches whose gradients of the
  loss *sums* are accumulated and divided once by the total denominator, so accumulation is exact.
  A non-finite loss, gradient or new parameter leaves params and optimizer state untouched
  (metrics["finite"]=0).
  """
  with_entropy = rl.entropy_coef > 0

  def terms_of(params, ref_params, mb: packing.PackedBatch) -> loss_lib.LossTerms:
    out = packing.token_logprobs(params, cfg, mb, rl.temperature, with_entropy)
    logp, ent = out if with_entropy else (out, None)
    ref = None
    if ref_params is not None and rl.kl_coef > 0:
      ref = jax.lax.stop_gradient(packing.token_logprobs(ref_params, cfg, mb, rl.temperature))
    return loss_lib.ppo_loss(
        logp, mb.old_logp, mb.advantages, mb.loss_mask, agg=rl.loss_agg, max_len=response_len,
        eps_low=rl.clip_low, eps_high=rl.clip_high, ref_logp=ref, kl_coef=rl.kl_coef,
        kl_type=rl.kl_type, entropy=ent, entropy_coef=rl.entropy_coef)

  def step(state: TrainState, batch: packing.PackedBatch):
    k = rl.micro_batches
    micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

    def body(carry, mb):
      grads, acc = carry
      (_, terms), g = jax.value_and_grad(
          lambda p: (terms_of(p, state.ref_params, mb).loss_sum,
                     terms_of(p, state.ref_params, mb)), has_aux=True)(state.params)
      grads = jax.tree.map(jnp.add, grads, g)
      return (grads, loss_lib.combine([acc, terms])), None

    zero_terms = jax.eval_shape(terms_of, state.params, state.ref_params,
                                jax.tree.map(lambda x: x[0], micro))
    zero_terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_terms)
    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    if k == 1:
      (grads, terms), _ = body((zero_grads, zero_terms), jax.tree.map(lambda x: x[0], micro))
    else:
      (grads, terms), _ = jax.lax.scan(body, (zero_grads, zero_terms), micro)
    denom = jnp.where(terms.loss_denom > 0, terms.loss_denom, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # New parameters are checked too: finite gradients can still overflow them.
    finite = (jnp.isfinite(grad_norm) & jnp.isfinite(terms.loss)
              & jax.tree.reduce(jnp.logical_and,
                                jax.tree.map(lambda p: jnp.all(jnp.isfinite(p)), params)))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    metrics = dict(terms.metric_values(), loss=terms.loss, grad_norm=grad_norm,
                   finite=finite.astype(jnp.float32),
                   trained_tokens=jnp.sum(batch.loss_mask).astype(jnp.float32))
    return new_state, metrics

  if state_sharding is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(step, donate_argnums=0, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, metric_sharding))


# ---------------------------------------------------------------------------------------------
# The whole step.


@dataclasses.dataclass
class RLContext:
  """Everything an RL step needs besides the state and the prompts (built once per run)."""

  cfg: ModelConfig
  tokenizer: Tokenizer
  toks: at.AnytimeTokens
  rl: RLConfig
  grader: Any  # brpo.rewards.Grader
  train_step: Callable
  lr_fn: Callable[[int], float]
  mesh: Any = None
  prompt_length: int | None = None

  @property
  def spec(self) -> at.AnytimeConfig:
    return at.AnytimeConfig(budgets=self.rl.budget_spec.budgets, group_size=self.rl.group_size,
                            n_summaries=self.rl.n_summaries, summary_len=self.rl.summary_len)


def _put_rows(x, mesh):
  """Places a [R, ...] array with its rows split over (data, fsdp) when they divide evenly.

  `x` is numpy (the same on every process) or a global array."""
  if mesh is None:
    return x
  return jax.device_put(x, multihost.row_sharding(mesh, x.shape[0], x.ndim))


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
  ro = at.anytime_rollout(state.params, ctx.cfg, prompts, spec, ctx.toks, key_roll,
                          think_strategy=strategy, summary_strategy=strategy,
                          prompt_length=ctx.prompt_length, timings=timings, mesh=ctx.mesh)
  t1 = time.perf_counter()
  refs = [ref for ref in references for _ in range(g)]
  rewards = score_rollout(ro, ctx.tokenizer, ctx.toks, refs, ctx.grader)  # [R, m, A]
  t2 = time.perf_counter()
  canonical = multihost.fetch(ro.cuts.canonical)
  think_adv, summ_adv, summ_train = compute_advantages(
      rewards.reshape(n, g, m, -1), rl, canonical)
  # Placed like the rollout's rows (every process holds the same advantages).
  put = (lambda x: _put_rows(x, ctx.mesh)) if ctx.mesh is not None else jnp.asarray
  batch = packing.pack(ro, put(think_adv), put(summ_adv), summary_train=put(summ_train))
  # Mini-batches of whole groups, in a fresh order each epoch.
  rows_per_mb = rl.mini_batch_prompts * g
  step_metrics: list[dict[str, Any]] = []
  for epoch in range(rl.ppo_epochs):
    perm = multihost.fetch(jax.random.permutation(jax.random.fold_in(key_shuffle, epoch), n))
    order = (perm[:, None] * g + np.arange(g)[None]).reshape(-1)
    for start in range(0, n * g, rows_per_mb):
      idx = order[start:start + rows_per_mb]
      mb = jax.tree.map(lambda x: _put_rows(x[idx], ctx.mesh), batch)
      state, met = ctx.train_step(state, mb)
      step_metrics.append(met)
  step_metrics = multihost.fetch(step_metrics)
  t3 = time.perf_counter()
  state = state.replace(step=state.step + 1, rng=rng)
  return state, _metrics(ro, rewards, think_adv, step_metrics, rl, timings,
                         dict(rollout=t1 - t0, grading=t2 - t1, update=t3 - t2),
                         ctx.lr_fn(int(multihost.fetch(state.step)) - 1))


def _metrics(ro, rewards, think_adv, step_metrics, rl: RLConfig, timings, phases, lr):
  """Flat dict of floats for metrics.jsonl."""
  spec = rl.budget_spec
  h = multihost.fetch({"tl": ro.thinking_len, "end": ro.thinking_end, "sl": ro.summary_len,
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
  distinct = h["canon"] == np.arange(h["canon"].shape[1])
  gen = float(h["tl"].sum() + (h["sl"] * distinct[..., None]).sum())
  out["generated_tokens"] = gen
  out["rollout_tokens_per_s"] = gen / max(phases["rollout"], 1e-9)
  out["seconds/thinking"] = timings.get("thinking", float("nan"))
  out["seconds/summaries"] = timings.get("summaries", float("nan"))
  out["seconds/grading"] = phases["grading"]
  out["seconds/update"] = phases["update"]
  out["seconds/step"] = sum(phases.values())
  return out
