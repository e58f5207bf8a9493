"""The summary phase (benchmarks/decode.py): the sampler's shared-trunk branch decoding of every
cut against the plain approach of prefilling each cut context into a cache of its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.platform import best_time, random_prompts
from brpo.rollout import anytime as at
from brpo.rollout import sampling as smp
from models import decoder as dec
from models import masks


def _memory(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def summary_phase(params, cfg, rows: int, b_max: int, m: int, a: int, s: int, prompt_len: int,
                  repeats: int) -> dict[str, float]:
  """Both approaches decode the same C = m * A branches per thinking (greedy, S tokens, no early
  stop) after the same thinking, cut at the same budgets."""
  budgets = tuple(b_max // m * (j + 1) for j in range(m))
  toks = at.AnytimeTokens(eos_id=-5, pad_id=0, think_end_ids=(7,),
                          insert_running=tuple(range(11, 19)), insert_ended=(11, 12, 13))
  prompts = random_prompts(rows, prompt_len, cfg.vocab_size, 1)
  thinking = np.asarray(random_prompts(rows, b_max, cfg.vocab_size, 2))
  # The thinking cache, as the sampler leaves it: one prefill of prompt + thinking.
  tokens = jnp.asarray(np.concatenate([np.asarray(prompts), thinking], 1))
  valid = jnp.ones(tokens.shape, bool)
  trunk = jax.jit(lambda p, t: dec.prefill(p, cfg, t, masks.positions_from_valid(valid),
                                           masks.causal_mask(valid),
                                           dec.init_cache(cfg, rows, t.shape[1]))[1])(params,
                                                                                    tokens)
  # Cuts: every thinking runs past b_max here, so every budget is a distinct running cut.
  length = jnp.full((rows,), b_max + 1, jnp.int32)
  cuts = at.compute_cuts(length, jnp.full((rows,), -1), budgets, toks)
  rep = lambda x: jnp.repeat(x, a, axis=1)
  args = (params, cfg, trunk, jnp.zeros((rows,), jnp.int32), jnp.full((rows,), prompt_len),
          rep(cuts.length), rep(cuts.insert), rep(cuts.insert_len),
          jnp.ones((rows, m * a), bool), jax.random.PRNGKey(0))
  kw = dict(prompt_len=prompt_len, summary_len=s, strategy=smp.Greedy(), eos_id=-5, pad_id=0)
  t_ours = best_time(lambda: at.decode_branches(*args, **kw)[0].block_until_ready(), repeats)
  mem_ours = _memory(at.decode_branches.lower(*args, **kw).compile())
  # The plain approach: each branch's context [prompt | thinking[:cut] | inserted] prefilled
  # into a cache of its own, then S tokens decoded.
  contexts = []
  ins = np.asarray(cuts.insert)
  for r in range(rows):
    for j, b in enumerate(budgets):
      ctx = prompts[r] + thinking[r, :b].tolist() + ins[r, j, :int(cuts.insert_len[r, j])].tolist()
      contexts.extend([ctx] * a)

  def plain():
    out = smp.sample(params, cfg, contexts, s, smp.Greedy(), pad_id=0)
    out.tokens.block_until_ready()

  t_plain = best_time(plain, repeats)
  p_tok, p_valid = smp.pad_prompts(contexts, 0)
  stops = smp.stop_array([[-2]])
  pre = smp.prefill_jit.lower(params, cfg, p_tok, p_valid, stops, jax.random.PRNGKey(0),
                              n_new=s, strategy=smp.Greedy(), pad_id=0).compile()
  state = jax.eval_shape(lambda: smp.prefill_jit(params, cfg, p_tok, p_valid, stops,
                                                 jax.random.PRNGKey(0), n_new=s,
                                                 strategy=smp.Greedy(), pad_id=0))
  dcd = smp.decode_jit.lower(params, cfg, state, stops, strategy=smp.Greedy(), pad_id=0,
                             write_last=False).compile()
  mem_plain = max(_memory(pre), _memory(dcd))
  return {"rows": rows, "branches": rows * m * a, "b_max": b_max, "S": s,
          "shared_s": t_ours, "reprefill_s": t_plain, "speedup": t_plain / t_ours,
          "shared_mem_mb": mem_ours / 2 ** 20, "reprefill_mem_mb": mem_plain / 2 ** 20,
          "mem_ratio": mem_ours / mem_plain}
