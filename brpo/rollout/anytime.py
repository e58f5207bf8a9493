"""Anytime decoding (SPEC §4): sample each thinking once, cut it at every budget, and summarize
every cut A times in one jitted loop that reads the thinking KV cache in place.

Shapes: N prompts, G thinkings per prompt, R = N * G rows, m budgets, A summaries per cut,
C = m * A branches per row, S summary length, I inserted tokens (padded), W = I + S branch slots,
P padded prompt length, Tt = P + b_m trunk cache slots.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from brpo import rows as rows_lib
from brpo.rollout import sampling
from models.config import ModelConfig
from models.tokenizer import Tokenizer

from brpo.core.texts import ANSWER_MARKER, ELLIPSIS_TEXT  # noqa: F401  (SPEC §4 texts)
from brpo.rollout.branches import (  # noqa: F401  (re-exported: anytime.decode_branches, ...)
    BranchState, branch_attention, branch_attention_filled, decode_branches)

SHARED_CUTS = ("resample", "reuse")

# How a thinking ended (`thinking_end`).
END_BUDGET, END_THINK, END_EOS = -1, 0, 1


@dataclasses.dataclass(frozen=True)
class AnytimeTokens:
  """The token ids anytime decoding needs, found from a tokenizer by name."""

  eos_id: int
  pad_id: int
  think_end_ids: tuple[int, ...]  # the form written into inserted text
  insert_running: tuple[int, ...]  # "...\n\n...\n\n</think>" + "\n\n**Final Answer**\n"
  insert_ended: tuple[int, ...]  # "\n\n**Final Answer**\n"
  # Every token sequence that ends a thinking with `</think>` (one with a dedicated token).
  think_end_variants: tuple[tuple[int, ...], ...] = ()

  @classmethod
  def from_tokenizer(cls, tok: Tokenizer) -> "AnytimeTokens":
    marker = tuple(tok.encode(ANSWER_MARKER))
    running = tuple(tok.encode(ELLIPSIS_TEXT)) + tuple(tok.think_end_ids) + marker
    return cls(eos_id=tok.eos_id, pad_id=tok.pad_id, think_end_ids=tuple(tok.think_end_ids),
               insert_running=running, insert_ended=marker,
               think_end_variants=tuple(getattr(tok, "think_end_variants", ())))

  @property
  def thinking_stops(self) -> list[tuple[int, ...]]:
    """Stop sequences of the thinking: the `</think>` forms, then end of sequence (last)."""
    return list(self.think_end_variants or (self.think_end_ids,)) + [(self.eos_id,)]

  def end_kind(self, stop_reason):
    """Sampler stop index [R] -> END_BUDGET (-1), END_THINK or END_EOS."""
    n_think = len(self.thinking_stops) - 1
    return jnp.where(stop_reason < 0, END_BUDGET,
                     jnp.where(stop_reason < n_think, END_THINK, END_EOS)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class AnytimeConfig:
  """What to sample: budgets b_1 < ... < b_m, G thinkings per prompt, A summaries of <= S
  tokens per budget.

  `shared_cuts`: a thinking that ended before b_j gives budgets j..m one shared cut. "resample"
  (the paper's code, SPEC §4) samples A fresh summaries for every budget; "reuse" samples A once
  per distinct cut and shows them at every budget that shares it (cheaper; used by evaluation).
  """

  budgets: tuple[int, ...]
  group_size: int = 8
  n_summaries: int = 4
  summary_len: int = 128
  shared_cuts: str = "resample"

  def __post_init__(self):
    b = self.budgets
    if not b or any(x <= 0 for x in b) or any(x >= y for x, y in zip(b, b[1:])):
      raise ValueError(f"budgets {b} must be positive and strictly increasing")
    if self.group_size < 1 or self.n_summaries < 1 or self.summary_len < 1:
      raise ValueError(f"group_size, n_summaries and summary_len must be >= 1: {self}")
    if self.shared_cuts not in SHARED_CUTS:
      raise ValueError(f"shared_cuts={self.shared_cuts!r}: must be one of {SHARED_CUTS}")

  @property
  def b_max(self) -> int:
    return self.budgets[-1]


@flax.struct.dataclass
class Cuts:
  """Where each thinking is cut for each budget. All [R, m]."""

  length: jax.Array  # thinking tokens kept before the inserted text
  ended: jax.Array  # bool: the thinking ended (</think> or eos) at or before the budget
  eos: jax.Array  # bool: the cut holds the end-of-sequence that ended the thinking (reward 0)
  canonical: jax.Array  # budget index whose summaries serve this budget (shared cuts)
  insert: jax.Array  # [R, m, I] inserted tokens, pad after insert_len
  insert_len: jax.Array


@flax.struct.dataclass
class AnytimeRollout:
  """Everything one anytime rollout produced (device arrays)."""

  prompt: jax.Array  # [R, P] left-padded prompt tokens
  prompt_valid: jax.Array  # [R, P] bool
  thinking: jax.Array  # [R, b_m] int32 (pad after the end)
  thinking_logp: jax.Array  # [R, b_m] float32
  thinking_len: jax.Array  # [R] tokens, the stop token(s) included
  thinking_end: jax.Array  # [R] END_BUDGET, END_THINK or END_EOS
  cuts: Cuts
  # Summaries per budget. With `reused`, a budget that shares its cut with an earlier one
  # (cuts.canonical != j) repeats that budget's summaries, which must not be trained twice;
  # otherwise every budget holds its own A samples.
  summary: jax.Array  # [R, m, A, S] int32 generated summary tokens (pad after the end)
  summary_logp: jax.Array  # [R, m, A, S] float32
  summary_len: jax.Array  # [R, m, A] generated tokens (eos included)
  budgets: jax.Array  # [m]
  reused: bool = flax.struct.field(pytree_node=False, default=False)


def compute_cuts(thinking_len, thinking_end, budgets, toks: AnytimeTokens) -> Cuts:
  """SPEC §4 cut rule. thinking_len, thinking_end [R]; budgets [m] -> Cuts [R, m].

  A thinking that ended with end-of-sequence instead of `</think>` is cut after the eos and gets
  the running insert ("...</think>" + marker), as in the official code; its cut scores 0.
  """
  budgets = jnp.asarray(budgets, jnp.int32)
  m = budgets.shape[0]
  ended = (thinking_end >= 0)[:, None] & (thinking_len[:, None] <= budgets[None, :])
  length = jnp.where(ended, thinking_len[:, None], budgets[None, :])
  first_ended = jnp.argmax(ended, axis=1)
  canonical = jnp.where(ended, first_ended[:, None], jnp.arange(m)[None, :]).astype(jnp.int32)
  n_ins = max(len(toks.insert_running), len(toks.insert_ended))
  run = np.full((n_ins,), toks.pad_id, np.int32)
  run[:len(toks.insert_running)] = toks.insert_running
  end = np.full((n_ins,), toks.pad_id, np.int32)
  end[:len(toks.insert_ended)] = toks.insert_ended
  closed = ended & (thinking_end == END_THINK)[:, None]  # ended with `</think>`
  insert = jnp.where(closed[..., None], jnp.asarray(end), jnp.asarray(run))
  insert_len = jnp.where(closed, len(toks.insert_ended), len(toks.insert_running))
  eos = ended & (thinking_end == END_EOS)[:, None]
  return Cuts(length=length.astype(jnp.int32), ended=ended, eos=eos, canonical=canonical,
              insert=insert.astype(jnp.int32), insert_len=insert_len.astype(jnp.int32))


def _take_summaries(tokens, logp, insert_len, summary_len: int):
  """Branch slots [.., W] -> the generated part [.., S], aligned at 0."""
  idx = insert_len[..., None] + jnp.arange(summary_len)
  return (jnp.take_along_axis(tokens, idx, axis=-1), jnp.take_along_axis(logp, idx, axis=-1))


def anytime_rollout(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                    spec: AnytimeConfig, toks: AnytimeTokens, rng, *,
                    think_strategy=sampling.Temperature(1.0),
                    summary_strategy=sampling.Temperature(1.0),
                    prompt_length: int | None = None,
                    timings: dict[str, float] | None = None, **kw) -> AnytimeRollout:
  """`rollout_rows` on N prompts, each repeated G times and left-padded here (one process).
  `kw`: rollout_rows's rollout_batch, compact_every, compact_min_rows, dense, block.

  The run system pads and places rows across processes itself (`brpo.run.multihost`).
  """
  rows = [list(p) for p in prompts for _ in range(spec.group_size)]
  prompt, valid = sampling.pad_prompts(rows, toks.pad_id, prompt_length)
  return rollout_rows(params, cfg, prompt, valid, spec, toks, rng, think_strategy=think_strategy,
                      summary_strategy=summary_strategy, timings=timings, **kw)


def rollout_rows(params, cfg: ModelConfig, prompt, valid, spec: AnytimeConfig,
                 toks: AnytimeTokens, rng, *, think_strategy=sampling.Temperature(1.0),
                 summary_strategy=sampling.Temperature(1.0),
                 timings: dict[str, float] | None = None, rollout_batch: int = 0,
                 compact_every: int = 0, compact_min_rows: int = 8, dense: bool = False,
                 block: int | None = None) -> AnytimeRollout:
  """Samples one thinking per row (up to b_m tokens) and A summaries per budget.

  prompt, valid: [R, P] left-padded prompt rows (R = N * G: the G rows of a prompt adjacent),
  plain or global (sharded) arrays. The thinking is sampled once; its KV cache is then read in
  place by all m * A branches of its row. With spec.shared_cuts == "reuse", a budget whose cut
  equals an earlier budget's (the thinking ended before it) gets no branches of its own:
  `cuts.canonical` points to the budget whose summaries serve it. With `timings`, waits for each
  phase and records its seconds ("thinking", "summaries"; summed over chunks).

  rollout_batch: 0 samples all R rows in one sampler call, with one batch key per step (the
    draws of the original sampler). n > 0 samples n rows per call (thinking and summaries; the
    last chunk is padded), so the KV cache of only n rows is alive at once; the rows then draw
    with per-row keys fold_in(key, global row index) (and per branch), so the result does not
    depend on n. With rows split over processes, a chunk takes n / P rows from each of the P
    processes' blocks and lies on the mesh like the batch (`_chunked`).
  compact_every: decode the thinking in chunks of this many steps, moving the rows still running
    into a smaller batch bucket of at least compact_min_rows rows between chunks
    (`sampling.sample_padded`'s min_bucket); uses per-row keys like rollout_batch > 0 (0 = off).
  dense, block: attention over whole caches (the reference) / the block size of the filled-only
    attention (None: cfg.decode_block).
  """
  if rollout_batch < 0 or compact_every < 0:
    raise ValueError(f"rollout_batch={rollout_batch} and compact_every={compact_every} must be "
                     ">= 0")
  rng_think, rng_sum = jax.random.split(rng)
  kw = dict(think_strategy=think_strategy, summary_strategy=summary_strategy, timings=timings,
            compact_every=compact_every, min_bucket=compact_min_rows, dense=dense, block=block)
  if timings is not None:
    timings.update(thinking=0.0, summaries=0.0)
  if not rollout_batch and not compact_every:
    return _rollout_chunk(params, cfg, prompt, valid, spec, toks, rng_think, rng_sum, **kw)
  return _chunked(params, cfg, prompt, valid, spec, toks, rng_think, rng_sum,
                  rollout_batch or prompt.shape[0], **kw)


def _chunked(params, cfg: ModelConfig, prompt, valid, spec: AnytimeConfig, toks: AnytimeTokens,
             rng_think, rng_sum, n: int, **kw) -> AnytimeRollout:
  """`_rollout_chunk` on chunks of n rows with per-row keys (see `rollout_rows`).

  Each process holds a block of rows (all of them with one process, or when the batch is
  replicated); chunk i takes rows [i*k, (i+1)*k) of every block (k = n / blocks, the last
  chunk padded with copies of the block's last row), as one global array on the batch's mesh,
  and every process keeps its own rows of the result.
  """
  r = prompt.shape[0]
  c = len(spec.budgets) * spec.n_summaries
  mesh = sampling.mesh_of(prompt)
  mine = rows_lib.local_slice(prompt)  # all rows with one process
  lo, held = mine.start, mine.stop - mine.start
  blocks = r // held
  if n % blocks:
    raise ValueError(f"rollout_batch={n} must be a multiple of the {blocks} processes that hold "
                     f"rows of the batch of {r}")
  k = n // blocks
  if mesh is not None and rows_lib.process_rows(rows_lib.row_sharding(mesh, n, 2), n) != slice(
      lo // held * k, lo // held * k + k):
    raise ValueError(f"rollout_batch={n}: the chunk's rows do not split over the mesh like the "
                     f"batch's; use a multiple of the mesh's data x fsdp size")
  ids = lo + np.arange(-(-held // k) * k)  # global row ids; padding past the block repeats
  ids_row = np.minimum(ids, lo + held - 1) - lo  # its last row (dropped again at the end)
  prompt, valid = (rows_lib.local_rows(x)[ids_row] for x in (prompt, valid))
  think_keys = np.asarray(sampling.row_keys(rng_think, ids))
  sum_keys = np.asarray(jax.vmap(lambda key: sampling.row_keys(key, np.arange(c)))(
      sampling.row_keys(rng_sum, ids)))  # [rows, C, 2]
  put = ((lambda x: rows_lib.put_rows(x, rows_lib.row_sharding(mesh, n, x.ndim), n))
         if mesh is not None else jnp.asarray)
  parts = []
  for i in range(0, len(ids), k):
    part = _rollout_chunk(params, cfg, put(prompt[i:i + k]), put(valid[i:i + k]), spec, toks,
                          put(think_keys[i:i + k]), put(sum_keys[i:i + k]), **kw)
    parts.append(part.replace(budgets=None))
  budgets = jnp.asarray(spec.budgets, jnp.int32)
  if mesh is None:
    join = lambda *xs: jnp.concatenate(xs, axis=0)[:r]
    return jax.tree.map(join, *parts).replace(budgets=budgets)
  join = lambda *xs: np.concatenate([rows_lib.local_rows(x) for x in xs], axis=0)[:held]
  back = lambda x: rows_lib.put_rows(x, rows_lib.row_sharding(mesh, r, x.ndim), r)
  return jax.tree.map(lambda *xs: back(join(*xs)), *parts).replace(budgets=budgets)


def _rollout_chunk(params, cfg: ModelConfig, prompt, valid, spec: AnytimeConfig,
                   toks: AnytimeTokens, rng_think, rng_sum, *, think_strategy, summary_strategy,
                   timings, compact_every, min_bucket, dense, block) -> AnytimeRollout:
  """One sampler call: the thinkings of these rows, then all their branches."""
  clock = time.perf_counter()
  a, s_len = spec.n_summaries, spec.summary_len
  m = len(spec.budgets)
  out, state = sampling.sample_padded(
      params, cfg, prompt, valid, spec.b_max, think_strategy, toks.thinking_stops, rng_think,
      pad_id=toks.pad_id, write_last=True, return_state=True, compact_every=compact_every,
      min_bucket=min_bucket, dense=dense, block=block)
  if timings is not None:
    jax.block_until_ready(out.tokens)
    timings["thinking"] += time.perf_counter() - clock
    clock = time.perf_counter()
  thinking_end = toks.end_kind(out.stop_reason)
  cuts = compute_cuts(out.lengths, thinking_end, spec.budgets, toks)
  r = prompt.shape[0]
  rep = lambda x: jnp.repeat(x, a, axis=1)  # [R, m, ...] -> [R, m * A, ...]
  reuse = spec.shared_cuts == "reuse"
  active = rep(cuts.canonical == jnp.arange(m)[None, :] if reuse
               else jnp.ones(cuts.canonical.shape, bool))
  prompt_len = state.cache.length - spec.b_max
  tokens, logp, gen_len = decode_branches(
      params, cfg, state.cache, state.start, state.n_prompt, rep(cuts.length), rep(cuts.insert),
      rep(cuts.insert_len), active, rng_sum, prompt_len=prompt_len, summary_len=s_len,
      strategy=summary_strategy, eos_id=toks.eos_id, pad_id=toks.pad_id, dense=dense,
      block=block, mesh=sampling.mesh_of(prompt))
  if timings is not None:
    jax.block_until_ready(tokens)
    timings["summaries"] += time.perf_counter() - clock
  shape = (r, m, a)
  tokens = tokens.reshape(*shape, -1)
  logp = logp.reshape(*shape, -1)
  summary, summary_logp = _take_summaries(tokens, logp, cuts.insert_len[..., None], s_len)
  gen_len = gen_len.reshape(shape)
  if reuse:  # Budgets that share a cut show the summaries of the budget that decoded them.
    canon = cuts.canonical[:, :, None, None]
    summary = jnp.take_along_axis(summary, canon, axis=1)
    summary_logp = jnp.take_along_axis(summary_logp, canon, axis=1)
    gen_len = jnp.take_along_axis(gen_len, cuts.canonical[:, :, None], axis=1)
  return AnytimeRollout(
      prompt=jnp.asarray(prompt), prompt_valid=jnp.asarray(valid), thinking=out.tokens,
      thinking_logp=out.logprobs, thinking_len=out.lengths, thinking_end=thinking_end,
      cuts=cuts, summary=summary, summary_logp=summary_logp,
      summary_len=gen_len, budgets=jnp.asarray(spec.budgets, jnp.int32), reused=reuse)
