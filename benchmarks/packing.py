"""Tree-packed training pass against the plain layout, grader throughput, and the packed update's MFU.

  python -m benchmarks.packing [--quick] [--out packing.json] [--platform=cpu|gpu|tpu|auto]
      [--model=tiny --b_max=1024 --m=4 --a=4 --s=32 --prompt_len=32 --rows=8]
  python -m benchmarks.packing --mfu --platform=gpu   # the paper's 1.5B shape, random weights
  python -m benchmarks.packing --model=tiny --rows=64 --b_max=96 --s=15 --prompt_len=16 \
      --blocks=128,32   # the tiny default's update shape (512-slot rows), at each block

--blocks: the packed forward + backward of all rows at once (one mini-batch, as a run's update
does) at each `--attention_block`, with its ratio to the first block listed.

--mfu: the whole jitted update (forward, backward, AdamW) of packed rows of the 1.5B model at
b_max 2048, 4096 and 8000 (--mfu_b_max), one row per micro-batch, timed after compilation;
MFU = model FLOPs (6 x parameters per slot plus causal attention over each slot's visible keys,
no remat recomputation counted) / time / --peak_tflops.

Packed: one row per thinking holding prompt, thinking and all m * A branches (brpo.packing.pack,
block-structured tree attention). Ragged: the same rows with their live slots moved left and cut to
the narrowest of --pack_buckets widths that holds the longest (brpo.packing.compact). Plain: the thinking and every branch as its own causal
sequence (brpo.packing.unpack). Both compute the same PPO loss and gradients (tests/test_packing.py);
here they are timed (forward + backward, jitted, after compilation) and their compiled memory
compared. Both accumulate gradients over one thinking at a time (the plain layout's 17 rows of
~1,100 slots per thinking do not fit in memory all at once). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.platform import set_platform

set_platform()

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


def attention_context(batch) -> float:
  """Keys visible to every real slot, summed (causal-attention work): trunk keys below the
  slot's limit, plus its own branch's earlier slots."""
  br = np.asarray(batch.branch)
  lim = np.asarray(batch.limit).astype(np.float64)
  own = np.zeros_like(lim)  # a branch slot sees its branch's earlier slots and itself
  for r in range(br.shape[0]):
    for b in np.unique(br[r][br[r] > 0]):
      at_b = br[r] == b
      own[r, at_b] = np.arange(1, at_b.sum() + 1)
  return float(np.where(br >= 0, lim + own, 0).sum())


def measure_mfu(args) -> dict:
  """The jitted packed update (one row per micro-batch) of --model at each of --mfu_b_max."""
  from brpo.run import config as run_config
  from brpo.train import step as train_lib

  cfg = config_lib.get_config(args.model, dtype=args.dtype, param_dtype="float32",
                              remat=args.remat, scan_layers=args.scan_layers)
  params = dec.init_params(cfg, jax.random.PRNGKey(0))
  m, a, s = args.m, args.a, args.s
  out = {}
  for b_max in [int(x) for x in args.mfu_b_max.split(",")]:
    ro = synthetic_rollout(args.rows, b_max, m, a, s, args.prompt_len, cfg.vocab_size)
    adv_t = jax.random.normal(jax.random.PRNGKey(1), (args.rows, m))
    adv_s = jax.random.normal(jax.random.PRNGKey(2), (args.rows, m, a))
    batch = pk.pack(ro, adv_t, adv_s)
    rl = run_config.RLConfig(budgets=tuple(int(b) for b in np.asarray(ro.budgets)),
                             n_summaries=a, summary_len=s, group_size=args.rows,
                             prompts_per_batch=1, mini_batch_prompts=1, micro_batches=args.rows)
    opt = train_lib.make_optimizer(run_config.OptimConfig(), 100, cfg)
    state = train_lib.init_train_state(jax.tree.map(jnp.copy, params), opt, 0)
    step = train_lib.make_train_step(cfg, opt, rl, batch.response_len)
    t0 = time.perf_counter()
    state, met = step(state, batch)
    jax.block_until_ready(met)
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      state, met = step(state, batch)
      jax.block_until_ready(met)
      best = min(best, time.perf_counter() - t0)
    real = int((np.asarray(batch.branch) >= 0).sum())
    flops = 3 * (real * cfg.flops_per_token(0)
                 + cfg.n_layers * 4 * cfg.n_heads * cfg.head_dim * attention_context(batch))
    mfu = flops / best / (args.peak_tflops * 1e12)
    print(f"b_max={b_max:5d}: {args.rows} rows of {batch.tokens.shape[1]} slots ({real} real), "
          f"update {best:.3f} s (first call {compile_s:.0f} s), {flops / best / 1e12:.1f} "
          f"TFLOP/s, MFU {mfu:.3f} of {args.peak_tflops} TFLOP/s", flush=True)
    out[f"mfu_b{b_max}"] = round(mfu, 4)
    out[f"update_s_b{b_max}"] = round(best, 4)
    del state
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--platform", default="cpu", help="cpu, gpu, tpu or auto (read before jax "
                  "is imported)")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--rows", type=int, default=0, help="thinkings (default 8, quick 4; --mfu 4)")
  ap.add_argument("--model", default="", help="named config (default tiny with a 512 vocab; "
                  "--mfu: deepseek-r1-distill-qwen-1.5b)")
  ap.add_argument("--b_max", type=int, default=1024)
  ap.add_argument("--m", type=int, default=4)
  ap.add_argument("--a", type=int, default=4)
  ap.add_argument("--s", type=int, default=0, help="summary length (default 32; --mfu 128)")
  ap.add_argument("--prompt_len", type=int, default=0, help="(default 32; --mfu 1024)")
  ap.add_argument("--dtype", default="", help="compute dtype (default float32; --mfu bfloat16)")
  ap.add_argument("--remat", default="full", help="--mfu: remat of the layers")
  ap.add_argument("--scan_layers", default="true", help="--mfu: scanned layers")
  ap.add_argument("--mfu", action="store_true", help="measure the packed update's MFU")
  ap.add_argument("--mfu_b_max", default="2048,4096,8000")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--peak_tflops", type=float, default=989.0,
                  help="the accelerator's dense bfloat16 peak (H100/H200 SXM: 989)")
  ap.add_argument("--blocks", default="", help="also time the packed pass at these attention "
                  "blocks, e.g. 128,32 (ratios to the first)")
  ap.add_argument("--pack_buckets", type=int, default=16, help="the ragged layout's widths "
                  "(brpo.train.packing.bucket_widths)")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  args.scan_layers = str(args.scan_layers).lower() in ("1", "true", "yes")
  if args.mfu:
    args.model = args.model or "deepseek-r1-distill-qwen-1.5b"
    args.rows = args.rows or 4
    args.s = args.s or 128
    args.prompt_len = args.prompt_len or 1024
    args.dtype = args.dtype or "bfloat16"
    print(f"{args.model} on {jax.devices()[0].device_kind} ({jax.device_count()} devices; one "
          f"is used), remat={args.remat}, scan_layers={args.scan_layers}, dtype={args.dtype}")
    out = measure_mfu(args)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))
    return
  rows = args.rows or (4 if args.quick else 8)
  b_max, m, a, s, p = args.b_max, args.m, args.a, args.s or 32, args.prompt_len or 32
  if args.model:
    cfg = config_lib.get_config(args.model, dtype=args.dtype or "float32")
  else:
    cfg = config_lib.get_config("tiny", vocab_size=512)
  params = dec.init_params(cfg, jax.random.PRNGKey(0))
  ro = synthetic_rollout(rows, b_max, m, a, s, p, cfg.vocab_size)
  r = rows
  adv_t = jax.random.normal(jax.random.PRNGKey(1), (r, m))
  adv_s = jax.random.normal(jax.random.PRNGKey(2), (r, m, a))
  packed = pk.pack(ro, adv_t, adv_s)
  plain = pk.unpack(ro, adv_t, adv_s)
  needed = int(np.asarray(pk.live_slots(packed)).max())
  ragged = pk.ragged(packed, args.pack_buckets, cfg.attention_block)
  repeats = 1 if args.quick else 2
  # The same Dr. GRPO constant for all, so the losses are the same number.
  max_len = packed.response_len
  t_packed, m_packed = time_pass(params, cfg, packed, max_len, 1, repeats)
  t_plain, m_plain = time_pass(params, cfg, plain, max_len, 1 + m * a, repeats)
  t_ragged, m_ragged = time_pass(params, cfg, ragged, max_len, 1, repeats)
  trained = int(packed.loss_mask.sum())
  print(f"{args.model or 'tiny'} model ({cfg.n_params:,} parameters), {rows} thinkings, b_max={b_max}, m={m}, "
        f"A={a}, S={s}; {trained} trained tokens")
  print(f"{'layout':>7} {'rows':>5} {'slots':>6} {'fwd+bwd s':>9} {'memory MB':>9}")
  for name, b, t_, m_ in (("packed", packed, t_packed, m_packed), ("plain", plain, t_plain, m_plain),
                          ("ragged", ragged, t_ragged, m_ragged)):
    print(f"{name:>7} {b.tokens.shape[0]:>5} {b.tokens.shape[1]:>6} {t_:9.2f} {m_ / 2**20:9.1f}")
  print(f"ragged rows (--pack_buckets={args.pack_buckets}, longest row {needed} slots): "
        f"{t_packed / t_ragged:.2f}x the fixed layout's speed")
  blocks = {}
  if args.blocks:
    print(f"packed pass of all {rows} rows at once, by attention block")
    print(f"{'block':>5} {'fwd+bwd s':>9} {'vs first':>8}")
    for bs in [int(x) for x in args.blocks.split(",")]:
      t, _ = time_pass(params, cfg.replace(attention_block=bs), packed, max_len, rows, repeats)
      blocks[bs] = t
      print(f"{bs:>5} {t:9.3f} {next(iter(blocks.values())) / t:8.2f}")
  from benchmarks.grader import measure_grader

  g = measure_grader(n=200 if args.quick else 1000)
  out = {"packed_speedup": t_plain / t_packed, "packed_peak_mem_ratio": m_packed / m_plain,
         "ragged_speedup_vs_packed": t_packed / t_ragged,
         "grader_gsm8k_per_s": g["gsm8k_per_s"], "grader_math_per_s": g["math_per_s"]}
  if blocks:
    first = next(iter(blocks))
    out.update({f"block{bs}_speedup_vs_{first}": blocks[first] / t for bs, t in blocks.items()})
  if args.out:
    with open(args.out, "w") as f:
      json.dump({**out, "packed_s": t_packed, "plain_s": t_plain, "ragged_s": t_ragged,
                 "ragged_slots": ragged.tokens.shape[1], "packed_mem_bytes": m_packed,
                 "plain_mem_bytes": m_plain, "rows": rows, "grader": g}, f, indent=1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
