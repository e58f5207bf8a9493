"""Attention masks from per-token metadata: causal rows, left padding and the tree of branches.

One rule covers every case in this project (DESIGN.md "Training"): a token belongs to the trunk
(branch 0: prompt and thinking), to a branch k >= 1 (inserted text and summary after a cut), or
to padding (branch -1). A trunk key is visible to a query when its slot is below the query's
`limit`; a branch key is visible only to queries of the same branch at the same or a later slot.
"""

from __future__ import annotations

import jax.numpy as jnp

TRUNK = 0
PAD = -1


def tree_mask(branch, limit, kv_branch=None, kv_slot=None, q_slot=None):
  """Boolean attention mask [B, Tq, Tk].

  Args:
    branch: [B, Tq] int, branch id of each query token (0 trunk, k >= 1 branch, -1 pad).
    limit: [B, Tq] int, the query sees trunk keys at slots < limit (a trunk query at slot t
      uses t + 1, a branch query prompt_len + cut).
    kv_branch: [B, Tk] branch ids of the keys; defaults to `branch` (self-attention).
    kv_slot: [Tk] slot index of each key; defaults to arange(Tk).
    q_slot: [Tq] slot index of each query; defaults to arange(Tq).
  """
  kv_branch = branch if kv_branch is None else kv_branch
  tq, tk = branch.shape[1], kv_branch.shape[1]
  kv_slot = jnp.arange(tk) if kv_slot is None else kv_slot
  q_slot = jnp.arange(tq) if q_slot is None else q_slot
  kb = kv_branch[:, None, :]
  qb = branch[:, :, None]
  trunk = (kb == TRUNK) & (kv_slot[None, None, :] < limit[:, :, None])
  own = (kb == qb) & (kb > TRUNK) & (kv_slot[None, None, :] <= q_slot[None, :, None])
  return trunk | own


def causal_mask(valid):
  """[B, T] bool (False = padding) -> [B, T, T] causal mask that never attends to padding."""
  t = valid.shape[1]
  branch = jnp.where(valid, TRUNK, PAD)
  limit = jnp.broadcast_to(jnp.arange(1, t + 1), valid.shape)
  return tree_mask(branch, limit)


def positions_from_valid(valid):
  """[B, T] bool -> [B, T] int32 position ids counting only valid tokens (left padding -> 0)."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)
