"""Tree-packed training pass against the plain layout, and grader throughput.

  python -m benchmarks.packing [--quick] [--out packing.json]

Packed: one row per thinking holding prompt, thinking and all m * A branches (brpo.packing.pack,
block-structured tree attention). Plain: the thinking and every branch as its own causal
sequence (brpo.packing.unpack). Both compute the same PPO loss and gradients (tests/test_packing.py);
here they are timed (forward + backward, jitted, after compilation) and their compiled memory
compared. Both accumulate gradients over one thinking at a time (the plain layout's 17 rows of
~1,100 slots per thinking do not fit in memory all at once). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from brpo.rollout import anytime as at  # noqa: E402
from brpo.core import loss as loss_lib  # noqa: E402
from brpo.train import packing as pk  # noqa: E402
from models import config as config_lib  # noqa: E402
from models import decoder as dec  # noqa: E402


def synthetic_rollout(rows: int, b_max: int, m: int, a: int, s: int, prompt_len: int,
                      vocab: int, seed: int = 0) -> at.AnytimeRollout:
  """A rollout with the shapes of a real one: thinkings of random length (some end before
  b_max, so some cuts are shared), summaries of random length up to S."""
  rng = np.random.default_rng(seed)
  budgets = np.array([b_max // m * (j + 1) for j in range(m)], np.int32)
  think_len = rng.integers(b_max // 3, b_max + 1, rows).astype(np.int32)
  ended = rng.random(rows) < 0.5
  think_len = np.where(ended, think_len, b_max)
  end = np.where(ended, at.END_THINK, at.END_BUDGET).astype(np.int32)
  toks = at.AnytimeTokens(eos_id=2, pad_id=0, think_end_ids=(3,),
                          insert_running=tuple(range(10, 18)), insert_ended=(10, 11, 12))
  cuts = at.compute_cuts(jnp.asarray(think_len), jnp.asarray(end), budgets, toks)
  valid = np.ones((rows, prompt_len), bool)
  valid[:, :prompt_len // 4] = rng.random((rows, 1)) < 0.5
  return at.AnytimeRollout(
      prompt=jnp.asarray(rng.integers(20, vocab, (rows, prompt_len)), jnp.int32),
      prompt_valid=jnp.asarray(valid),
      thinking=jnp.asarray(rng.integers(20, vocab, (rows, b_max)), jnp.int32),
      thinking_logp=jnp.asarray(-rng.random((rows, b_max)) * 3, jnp.float32),
      thinking_len=jnp.asarray(think_len), thinking_end=jnp.asarray(end), cuts=cuts,
      summary=jnp.asarray(rng.integers(20, vocab, (rows, m, a, s)), jnp.int32),
      summary_logp=jnp.asarray(-rng.random((rows, m, a, s)) * 3, jnp.float32),
      summary_len=jnp.asarray(rng.integers(1, s + 1, (rows, m, a)), jnp.int32),
      budgets=jnp.asarray(budgets))


def _objective(cfg, max_len):
  def f(params, batch):
    logp = pk.token_logprobs(params, cfg, batch)
    terms = loss_lib.ppo_loss(logp, batch.old_logp, batch.advantages, batch.loss_mask,
                              max_len=max_len)
    return terms.loss_sum
  return f


def time_pass(params, cfg, batch, max_len: int, per_thinking: int,
              repeats: int) -> tuple[float, int]:
  """(best seconds of a jitted forward + backward, compiled memory in bytes).

  Gradients are accumulated over micro-batches of one thinking each (its `per_thinking` rows),
  as a run would do to fit memory: the plain layout cannot take all rows at once.
  """
  obj = _objective(cfg, max_len)

  def grad(params, batch):
    micro = jax.tree.map(lambda x: x.reshape(-1, per_thinking, *x.shape[1:]), batch)

    def body(acc, mb):
      v, g = jax.value_and_grad(obj)(params, mb)
      return jax.tree.map(jnp.add, acc, (v, g)), None

    zero = (jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
    return jax.lax.scan(body, zero, micro)[0]

  compiled = jax.jit(grad).lower(params, batch).compile()
  mem = compiled.memory_analysis()
  peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
  jax.block_until_ready(compiled(params, batch))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(params, batch))
    best = min(best, time.perf_counter() - t)
  return best, peak


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--rows", type=int, default=0, help="thinkings (default 8, quick 4)")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  rows = args.rows or (4 if args.quick else 8)
  b_max, m, a, s, p = 1024, 4, 4, 32, 32
  cfg = config_lib.get_config("tiny", vocab_size=512)
  params = dec.init_params(cfg, jax.random.PRNGKey(0))
  ro = synthetic_rollout(rows, b_max, m, a, s, p, cfg.vocab_size)
  r = rows
  adv_t = jax.random.normal(jax.random.PRNGKey(1), (r, m))
  adv_s = jax.random.normal(jax.random.PRNGKey(2), (r, m, a))
  packed = pk.pack(ro, adv_t, adv_s)
  plain = pk.unpack(ro, adv_t, adv_s)
  repeats = 1 if args.quick else 2
  # The same Dr. GRPO constant for both, so the two losses are the same number.
  max_len = packed.response_len
  t_packed, m_packed = time_pass(params, cfg, packed, max_len, 1, repeats)
  t_plain, m_plain = time_pass(params, cfg, plain, max_len, 1 + m * a, repeats)
  trained = int(packed.loss_mask.sum())
  print(f"tiny model ({cfg.n_params:,} parameters), {rows} thinkings, b_max={b_max}, m={m}, "
        f"A={a}, S={s}; {trained} trained tokens")
  print(f"{'layout':>7} {'rows':>5} {'slots':>6} {'fwd+bwd s':>9} {'memory MB':>9}")
  print(f"{'packed':>7} {packed.tokens.shape[0]:>5} {packed.tokens.shape[1]:>6} "
        f"{t_packed:9.2f} {m_packed / 2**20:9.1f}")
  print(f"{'plain':>7} {plain.tokens.shape[0]:>5} {plain.tokens.shape[1]:>6} "
        f"{t_plain:9.2f} {m_plain / 2**20:9.1f}")
  from benchmarks.grader import measure_grader

  g = measure_grader(n=200 if args.quick else 1000)
  out = {"packed_speedup": t_plain / t_packed, "packed_peak_mem_ratio": m_packed / m_plain,
         "grader_gsm8k_per_s": g["gsm8k_per_s"], "grader_math_per_s": g["math_per_s"]}
  if args.out:
    with open(args.out, "w") as f:
      json.dump({**out, "packed_s": t_packed, "plain_s": t_plain, "packed_mem_bytes": m_packed,
                 "plain_mem_bytes": m_plain, "rows": rows, "grader": g}, f, indent=1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
