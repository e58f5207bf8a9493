"""Decoding speed and memory: our sampler against `transformers` generate, and the shared-cache
summary phase against re-prefilling every cut context.

  python -m benchmarks.decode [--quick] [--out decode.json]

Prints tables; the last line is one JSON object with decode_speedup_vs_hf, roofline_fraction,
summary_speedup_vs_reprefill and summary_peak_mem_ratio (all measured in this run).
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
from brpo.rollout import sampling as smp  # noqa: E402
from models import config as config_lib  # noqa: E402
from models import decoder as dec  # noqa: E402
from models import masks  # noqa: E402


def _best(fn, repeats: int) -> float:
  """Best wall time of `repeats` calls of fn() (after one warm-up call that compiles)."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def matmul_rate(n: int = 2048) -> float:
  """FLOP/s of a large float32 matmul on this machine now (the roofline's denominator)."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  t = _best(lambda: f(x).block_until_ready(), 3)
  return 2 * n ** 3 / t


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(100, vocab - 100, size=length).tolist() for _ in range(batch)]


# ---------------------------------------------------------------------------------------------
# 1. Decode throughput against transformers.


def decode_throughput(batch: int, new_tokens: int, prompt_len: int, repeats: int,
                      params, cfg, hf_model) -> dict[str, float]:
  import torch

  prompts = _prompts(batch, prompt_len, cfg.vocab_size)

  def ours():
    out = smp.sample(params, cfg, prompts, new_tokens, smp.Greedy(), pad_id=0)
    out.tokens.block_until_ready()

  t_ours = _best(ours, repeats)
  ids = torch.tensor(prompts)
  attn = torch.ones_like(ids)

  def theirs():
    with torch.no_grad():
      hf_model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

  t_hf = _best(theirs, repeats)
  tokens = batch * new_tokens
  # Model FLOPs of a generated token, attending to the prompt plus half the new tokens on average.
  flops = cfg.flops_per_token(context=prompt_len + new_tokens // 2)
  return {"batch": batch, "new_tokens": new_tokens, "ours_tok_s": tokens / t_ours,
          "hf_tok_s": tokens / t_hf, "ours_s": t_ours, "hf_s": t_hf,
          "ours_flops": flops * tokens / t_ours, "hf_flops": flops * tokens / t_hf}


# ---------------------------------------------------------------------------------------------
# 2. Summary phase: shared trunk cache against re-prefilling each cut.


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
  prompts = _prompts(rows, prompt_len, cfg.vocab_size, 1)
  thinking = np.asarray(_prompts(rows, b_max, cfg.vocab_size, 2))
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
  t_ours = _best(lambda: at.decode_branches(*args, **kw)[0].block_until_ready(), repeats)
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

  t_plain = _best(plain, repeats)
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


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="smaller sizes, under ~3 minutes")
  ap.add_argument("--out", default="", help="also write the results here as JSON")
  args = ap.parse_args()
  import torch
  import transformers

  from models import checkpoint

  torch.set_num_threads(os.cpu_count() or 1)
  rate = matmul_rate()
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPU threads; "
        f"float32 matmul 2048^3: {rate / 1e9:.1f} GFLOP/s")
  path = checkpoint.smollm2_gguf_path()
  cfg, params = checkpoint.load_gguf(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32)
  hf.eval()
  results: dict[str, object] = {"matmul_gflops": rate / 1e9}
  batches = [32] if args.quick else [32, 128]
  rows = []
  for b in batches:
    r = decode_throughput(b, 128 if not args.quick else 64, 32, 1 if args.quick else 2,
                          params, cfg, hf)
    rows.append(r)
  print("\ndecode throughput, SmolLM2-135M float32, greedy, prompt 32 tokens")
  print(f"{'batch':>5} {'new':>4} {'ours tok/s':>10} {'hf tok/s':>9} {'speedup':>7} "
        f"{'ours roofline':>13} {'hf roofline':>11}")
  for r in rows:
    print(f"{r['batch']:>5} {r['new_tokens']:>4} {r['ours_tok_s']:10.1f} {r['hf_tok_s']:9.1f} "
          f"{r['ours_tok_s'] / r['hf_tok_s']:7.2f} {r['ours_flops'] / rate:13.3f} "
          f"{r['hf_flops'] / rate:11.3f}")
  results["decode"] = rows
  del hf
  tiny = config_lib.get_config("tiny", vocab_size=512)
  tiny_params = dec.init_params(tiny, jax.random.PRNGKey(0))
  sums = []
  shapes = [("tiny", tiny, tiny_params, 16 if not args.quick else 8)]
  shapes.append(("smollm2-135m", cfg, params, 2 if not args.quick else 1))
  for name, c, p, n_rows in shapes:
    r = summary_phase(p, c, n_rows, 512, 4, 4, 32, 32, 1 if args.quick else 2)
    r["model"] = name
    sums.append(r)
  print("\nsummary phase: m=4, A=4, b_max=512, S=32, every cut a running cut")
  print(f"{'model':>13} {'rows':>4} {'branches':>8} {'shared s':>8} {'reprefill s':>11} "
        f"{'speedup':>7} {'shared MB':>9} {'reprefill MB':>12} {'mem ratio':>9}")
  for r in sums:
    print(f"{r['model']:>13} {r['rows']:>4} {r['branches']:>8} {r['shared_s']:8.2f} "
          f"{r['reprefill_s']:11.2f} {r['speedup']:7.2f} {r['shared_mem_mb']:9.1f} "
          f"{r['reprefill_mem_mb']:12.1f} {r['mem_ratio']:9.3f}")
  results["summary_phase"] = sums
  head = rows[0]
  summary = {
      "decode_speedup_vs_hf": head["ours_tok_s"] / head["hf_tok_s"],
      "roofline_fraction": head["ours_flops"] / rate,
      "hf_roofline_fraction": head["hf_flops"] / rate,
      "summary_speedup_vs_reprefill": min(r["speedup"] for r in sums),
      "summary_peak_mem_ratio": max(r["mem_ratio"] for r in sums),
  }
  results["summary"] = summary
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
