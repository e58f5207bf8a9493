"""The update: train state, AdamW, and the jitted PPO step over packed rows (SPEC §7).

`make_train_step` returns `train_step(state, batch) -> (state, metrics)`: micro-batched exact
gradient accumulation of the (sum, denominator) loss, a skipped update when anything is non-finite.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from brpo.core import loss as loss_lib
from brpo.train import packing
from models import params as param_lib
from models import sharding as shd
from models.config import ModelConfig

# The run's frozen configs (brpo.run.config.OptimConfig / RLConfig) are passed in; only their
# fields are read here, so this package does not import the run system.
OptimConfig = RLConfig = Any


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


def make_optimizer(oc: OptimConfig, total_updates: int,
                   cfg: ModelConfig | None = None) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (SPEC §7). With the model's `cfg`, weight decay applies to
  its matrices only (models.params.decay_mask: not to norms or biases, stacked or not); without,
  to every parameter."""
  mask = None if cfg is None else param_lib.decay_mask(cfg)
  return optax.chain(
      optax.clip_by_global_norm(oc.grad_clip),
      optax.adamw(lr_schedule(oc, total_updates), b1=oc.b1, b2=oc.b2,
                  weight_decay=oc.weight_decay, mask=mask))


def state_shardings(params, param_axes, optimizer: optax.GradientTransformation, mesh,
                    with_ref: bool = False) -> TrainState:
  """The NamedSharding of every leaf of a TrainState on `mesh`, from the parameters' logical
  axes: params (and ref_params) by models.sharding.RULES, the optimizer's moments like their
  parameters, everything else (step, RNG, counts) replicated. `params` may be arrays or
  ShapeDtypeStructs (e.g. models.params.abstract_params)."""
  p_shard = shd.tree_shardings(param_axes, params, mesh)
  abstract = jax.eval_shape(optimizer.init, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  rep = shd.replicated(mesh)
  o_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract, p_shard,
                                  transform_non_params=lambda _: rep)
  return TrainState(params=p_shard, opt_state=o_shard, step=rep, rng=rep,
                    ref_params=p_shard if with_ref else None)


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int,
                     mesh=None, param_axes=None, with_ref: bool = False) -> TrainState:
  """A TrainState whose params (and the optimizer moments) are laid out on `mesh`."""
  if mesh is not None:
    if jax.process_count() > 1:
      # Every process holds the same values; a global layout is made from host copies (arrays
      # committed to one device cannot be placed on other processes' devices).
      params = jax.device_get(params)
    shardings = state_shardings(params, param_axes, optimizer, mesh)
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  else:
    opt_state = optimizer.init(params)
  rep = ((lambda x: jax.device_put(jax.device_get(x), shd.replicated(mesh))) if mesh is not None
         else (lambda x: x))
  return TrainState(params=params, opt_state=opt_state, step=rep(jnp.int32(0)),
                    rng=rep(jax.random.PRNGKey(seed)),
                    ref_params=jax.tree.map(jnp.copy, params) if with_ref else None)


def micro_batches(batch, k: int, mesh=None):
  """[B, ...] rows -> [k, B / k, ...]: micro-batch j holds rows j, j + k, j + 2k, ... (strided,
  so that with rows split over (data, fsdp) in contiguous blocks every device holds B / k / n of
  each micro-batch and none has to be moved). With a `mesh`, each micro-batch's rows are
  constrained to its batch axes."""

  def split(x):
    x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    if mesh is not None:
      x = shd.constrain(x, mesh, (None, "batch") + (None,) * (x.ndim - 2))
    return x

  return jax.tree.map(split, batch)


def check_rows(n_rows: int, mesh, what: str) -> None:
  """Raises ValueError (one line) when `n_rows` rows do not divide over the mesh's batch axes
  (data x fsdp): they would otherwise be replicated, every device computing every row."""
  if mesh is None:
    return
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if n_rows % ways:
    raise ValueError(f"{what}: {n_rows} rows do not divide over data x fsdp = {ways} devices of "
                     f"the mesh {dict(mesh.shape)}; change the batch sizes or --mesh")


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, rl: RLConfig,
                    response_len: int, mesh=None) -> Callable:
  """A jitted `train_step(state, batch) -> (state, metrics)` for one optimizer update.

  The batch (rows [B, T]) is split into `rl.micro_batches` micro-batches (strided rows,
  `micro_batches`) whose gradients of the loss *sums* are accumulated and divided once by the
  total denominator, so accumulation is exact. A non-finite loss, gradient or new parameter
  leaves params and optimizer state untouched (metrics["finite"]=0).

  With a `mesh`, the step is jitted with explicit shardings: in and out, the state's from the
  abstract state (`state_shardings` of models.params.abstract_params: parameters by their
  logical axes, optimizer moments like them, the rest replicated), the batch's rows over
  (data, fsdp), metrics replicated; activations are constrained inside (rows over (data, fsdp),
  heads and MLP over tensor). The state is donated either way.
  """
  with_entropy = rl.entropy_coef > 0
  k = rl.micro_batches

  def terms_of(params, ref_params, mb: packing.PackedBatch) -> loss_lib.LossTerms:
    out = packing.token_logprobs(params, cfg, mb, rl.temperature, with_entropy, mesh=mesh)
    logp, ent = out if with_entropy else (out, None)
    ref = None
    if ref_params is not None and rl.kl_coef > 0:
      ref = jax.lax.stop_gradient(
          packing.token_logprobs(ref_params, cfg, mb, rl.temperature, mesh=mesh))
    return loss_lib.ppo_loss(
        logp, mb.old_logp, mb.advantages, mb.loss_mask, agg=rl.loss_agg, max_len=response_len,
        eps_low=rl.clip_low, eps_high=rl.clip_high, ref_logp=ref, kl_coef=rl.kl_coef,
        kl_type=rl.kl_type, entropy=ent, entropy_coef=rl.entropy_coef)

  def step(state: TrainState, batch: packing.PackedBatch):
    if mesh is not None:
      check_rows(batch.tokens.shape[0] // k, mesh,
                 f"a micro-batch ({batch.tokens.shape[0]} rows / --micro_batches={k})")
    micro = micro_batches(batch, k, mesh)

    def loss_and_terms(p, mb):
      terms = terms_of(p, state.ref_params, mb)  # traced once: the loss and its metrics share it
      return terms.loss_sum, terms

    def body(carry, mb):
      grads, acc = carry
      (_, terms), g = jax.value_and_grad(loss_and_terms, has_aux=True)(state.params, mb)
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

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  state_sharding = state_shardings(param_lib.abstract_params(cfg), param_lib.param_axes(cfg),
                                   optimizer, mesh, with_ref=rl.kl_coef > 0)
  rep = shd.replicated(mesh)
  return jax.jit(step, donate_argnums=0,
                 in_shardings=(state_sharding, shd.batch_sharding(mesh, 2)),
                 out_shardings=(state_sharding, rep))


def make_logprob_fn(cfg: ModelConfig, rl: RLConfig, mesh=None) -> Callable:
  """A jitted `(params, batch) -> log-probs [B, T]` of every slot under `params` at the rollout
  temperature, `rl.micro_batches` rows-chunks at a time (no gradient: PPO's old log-probs)."""

  def fn(params, batch: packing.PackedBatch):
    k = rl.micro_batches
    micro = micro_batches(batch, k, mesh)
    _, out = jax.lax.scan(
        lambda _, mb: (None, packing.token_logprobs(params, cfg, mb, rl.temperature, mesh=mesh)),
        None, micro)
    # [k, B / k, T] of strided micro-batches -> rows in their original order.
    return jnp.swapaxes(out, 0, 1).reshape(batch.tokens.shape)

  return jax.jit(fn)
