"""Decoding speed and memory: our sampler against `transformers` generate (eager and static
cache), the memory-bandwidth roofline, finished rows that stop costing (compaction), and the
shared-cache summary phase against re-prefilling every cut context.

  python -m benchmarks.decode [--quick] [--platform cpu] [--model smollm2-gguf] [--batch 32]
      [--prompt_len 32] [--new_tokens 64] [--dtype float32] [--rounds 3] [--out decode.json]
      [--profile DIR]

Prints tables; the last line is one JSON object with decode_speedup_vs_hf (eager and static),
roofline_fraction, compaction_speedup, summary_speedup_vs_reprefill and summary_peak_mem_ratio
(all measured in this run). transformers runs where we do: on the CPU, or with --platform=gpu on
the CUDA card when torch sees one (else it is left out). The three engines are timed in turn,
`--rounds` times (3), and each one's best time counts, so that a machine that changes speed
during the run does not move their ratio. Roofline: per decode step the parameters and the KV
cache at the mean filled length are read once; their bytes over the step time, divided by the
memory bandwidth measured here (a jitted reduction over a 512 MB array; on accelerators the same).
`roofline_fraction` charges the whole call, prefill included, to the new tokens;
`loop_roofline_fraction` (ours) and `hf_loop_roofline_fraction` count the decode loop alone: each
engine is also timed on the prompt with one new token (its prefill), and the loop's step time is
(end to end - that) / (new tokens - 1). `--profile DIR` adds a `jax.profiler` trace of our decode
loop and a table of its XLA op kinds by thread time per step. The roofline's parts are in
benchmarks/roofline.py, the summary phase in benchmarks/summary_phase.py.

A decode step also has FLOPs: 2 per parameter per row (plus attention over the filled keys). At
batch B in float32 that is B / 2 FLOPs per parameter byte; where the machine's matmul peak
(measured here: the best of a jitted 2048^3 matmul) over its bandwidth is lower than that, the
step is compute-bound and no engine reaches the memory roofline. `memory_roofline_cap` is the
largest memory-roofline fraction the measured peak allows (memory time / max(memory time,
compute time)); `compute_fraction` is each engine's share of the peak FLOP rate. At small batch
the matmuls are skinny (B rows) and run well below that peak: `matmul_floor_s` times only the
model's own matmuls of one step at batch B (every layer's projections and the output head, no
attention, norms or sampling), and `floor_fraction` is that floor over our step time.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from benchmarks.platform import best_time, random_prompts

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "smaller sizes, a few minutes on 2 CPU cores")
flags.DEFINE_string("out", "", "also write the results here as JSON")
flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu", "tpu"], "JAX platform")
flags.DEFINE_string("model", "smollm2-gguf", "smollm2-gguf (the local SmolLM2-135M GGUF) or a "
                    "named config of models.config (random init), e.g. qwen2.5-1.5b")
flags.DEFINE_integer("batch", 32, "decode rows")
flags.DEFINE_integer("prompt_len", 32, "prompt tokens")
flags.DEFINE_integer("new_tokens", 0, "new tokens (0: 64 with --quick, else 128)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter and compute dtype")
flags.DEFINE_bool("hf", True, "measure transformers generate in the same run")
flags.DEFINE_bool("summary", True, "measure the summary phase against re-prefill")
flags.DEFINE_integer("compact_every", 16, "decode steps between compactions")
flags.DEFINE_string("profile", "", "also trace our decode loop with jax.profiler into this "
                    "folder and print its XLA op kinds by time per step")
flags.DEFINE_integer("rounds", 3, "decode throughput: rounds of timing every engine in turn (the "
                     "best time of each counts)")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.roofline import (matmul_floor, matmul_peak, memory_bandwidth,  # noqa: E402
                                 step_bytes, t_floor_roof)
from benchmarks.summary_phase import summary_phase  # noqa: E402
from brpo.rollout import sampling as smp  # noqa: E402
from models import config as config_lib  # noqa: E402
from models import decoder as dec  # noqa: E402


# ---------------------------------------------------------------------------------------------
# 1. Decode throughput against transformers.


def _best_in_turn(fns: dict, rounds: int) -> dict[str, float]:
  """Best wall time of each fn() over `rounds` rounds that call every fn in turn (after one
  warm-up call each): a machine that speeds up or slows down during the measurement then moves
  every engine alike, not the ratio between them."""
  for fn in fns.values():
    fn()
  best = {name: float("inf") for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - t)
  return best


def decode_throughput(batch: int, new_tokens: int, prompt_len: int, rounds: int, params, cfg,
                      hf_model, bandwidth: float, peak_flops: float) -> dict[str, float]:
  """Each engine end to end (prefill, then new_tokens greedy tokens), and each one's prefill
  with its first token alone (`*_first`): the difference is the decode loop of new_tokens - 1
  steps, whose own roofline fraction is `*_loop_roofline`."""
  prompts = random_prompts(batch, prompt_len, cfg.vocab_size)

  def ours(n=new_tokens):
    out = smp.sample(params, cfg, prompts, n, smp.Greedy(), pad_id=0)
    out.tokens.block_until_ready()

  engines = {"ours": ours, "ours_first": lambda: ours(1)}
  if hf_model is not None:
    import torch

    ids = torch.tensor(prompts, device=hf_model.device)
    attn = torch.ones_like(ids)
    for name, extra in [("hf", {}), ("hf_static", {"cache_implementation": "static"})]:
      def theirs(extra=extra, n=new_tokens):
        with torch.no_grad():
          hf_model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)
        if ids.is_cuda:
          torch.cuda.synchronize()
      engines[name] = theirs
      engines[name + "_first"] = lambda theirs=theirs: theirs(n=1)
  times = _best_in_turn(engines, rounds)
  t_ours = times["ours"]
  tokens = batch * new_tokens
  # Mean filled length over the steps: the prompt plus half the new tokens.
  per_step = step_bytes(cfg, params, batch, prompt_len + new_tokens / 2)
  flops = batch * cfg.flops_per_token(prompt_len + new_tokens / 2)  # per step
  t_mem, t_flop = per_step / bandwidth, flops / peak_flops
  floor = matmul_floor(params, cfg, batch)
  r = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
       "ours_tok_s": tokens / t_ours, "ours_s": t_ours,
       "roofline": per_step * new_tokens / t_ours / bandwidth,
       "compute_fraction": flops * new_tokens / t_ours / peak_flops,
       "step_gflop": flops / 1e9, "step_mb": per_step / 2 ** 20,
       "memory_roofline_cap": t_mem / max(t_mem, t_flop),
       "matmul_floor_s": floor, "floor_fraction": floor * new_tokens / t_ours}
  for name in ("ours", "hf", "hf_static"):
    if name not in times:
      continue
    t, first = times[name], times[name + "_first"]
    r[f"{name}_first_s"] = first
    loop = max(t - first, 1e-9) / max(new_tokens - 1, 1)  # seconds per decode-loop step
    r[f"{name}_loop_step_s"] = loop
    r[f"{name}_loop_roofline"] = per_step / loop / bandwidth
    if name != "ours":
      r[f"{name}_tok_s"], r[f"{name}_s"] = tokens / t, t
      r[f"{name}_roofline"] = per_step * new_tokens / t / bandwidth
      r[f"{name}_compute_fraction"] = flops * new_tokens / t / peak_flops
  r["loop_floor_fraction"] = floor / r["ours_loop_step_s"]
  return r


def profile_decode(params, cfg, batch: int, prompt_len: int, new_tokens: int, out_dir: str,
                   top: int = 12) -> list[tuple[str, float, float]]:
  """A `jax.profiler` trace of our decode loop (after its prefill) -> the `top` kinds of XLA
  op by thread time: (kind, ms per step summed over threads, calls per step). A kind is an op
  name without its numeric suffix (`transpose_copy_fusion.7` -> `transpose_copy_fusion`)."""
  import glob
  import gzip
  import re
  from collections import Counter

  prompts = random_prompts(batch, prompt_len, cfg.vocab_size)
  tokens, valid = smp.pad_prompts(prompts, 0)
  stops = smp.stop_array([[-2]])
  kw = dict(strategy=smp.Greedy(), pad_id=0)
  pre = lambda: smp.prefill_jit(params, cfg, tokens, valid, stops, jax.random.PRNGKey(0),
                                n_new=new_tokens, **kw)
  loop = lambda s: smp.decode_jit(params, cfg, s, stops, write_last=False, **kw)
  jax.block_until_ready(loop(pre()))  # compile both
  state = jax.block_until_ready(pre())
  jax.profiler.start_trace(out_dir, create_perfetto_trace=True)
  jax.block_until_ready(loop(state))
  jax.profiler.stop_trace()
  traces = sorted(glob.glob(os.path.join(out_dir, "plugins", "profile", "*", "*.trace.json.gz")),
                  key=os.path.getmtime)
  if not traces:
    raise SystemExit(f"--profile={out_dir}: the profiler wrote no *.trace.json.gz there")
  with gzip.open(traces[-1]) as f:
    events = json.load(f)["traceEvents"]
  ms, calls = Counter(), Counter()
  for e in events:
    name = e.get("name", "")
    # XLA's ops; not the executor, the thread pool, the Python frames or the end markers.
    if e.get("ph") != "X" or "::" in name or name.startswith(("$", "end:")) or "(" in name:
      continue
    kind = re.sub(r"[.\d]+$", "", name)
    ms[kind] += e["dur"] / 1e3
    calls[kind] += 1
  steps = new_tokens - 1
  return [(k, v / steps, calls[k] / steps) for k, v in ms.most_common(top)]


# ---------------------------------------------------------------------------------------------
# 1b. Finished rows stop costing: lognormal per-row lengths, one loop against compaction.


def compaction(params, cfg, batch: int, prompt_len: int, new_tokens: int, every: int,
               repeats: int, seed: int = 0) -> dict[str, float]:
  """Random-init models never stop, so each row gets a forced length: lognormal with median
  new_tokens / 4 and sigma 1, clipped to [1, new_tokens] (a long tail, as thinkings have)."""
  rng = np.random.default_rng(seed)
  limit = np.clip(np.round(rng.lognormal(np.log(new_tokens / 4), 1.0, batch)), 1,
                  new_tokens).astype(np.int32)
  prompts = random_prompts(batch, prompt_len, cfg.vocab_size, 3)
  res = {"batch": batch, "new_tokens": new_tokens, "every": every,
         "mean_len": float(limit.mean()), "max_len": int(limit.max())}
  for name, kw in [("one_loop", {}), ("compact", {"compact_every": every})]:
    def run():
      out = smp.sample(params, cfg, prompts, new_tokens, smp.Greedy(), pad_id=0, limit=limit,
                       write_last=True, **kw)
      out.tokens.block_until_ready()
    t = best_time(run, repeats)
    res[f"{name}_s"], res[f"{name}_tok_s"] = t, float(limit.sum()) / t
  res["speedup"] = res["one_loop_s"] / res["compact_s"]
  return res


def hf_device(platform: str) -> str | None:
  """Where transformers runs beside us: the CPU when we do, a CUDA card when we run on a GPU and
  torch sees one, else nowhere (None: no comparison across devices)."""
  if platform == "cpu":
    return "cpu"
  import torch
  return "cuda" if platform == "gpu" and torch.cuda.is_available() else None


def hf_model_for(cfg, gguf_path: str | None):
  """The transformers model of the same shape: the GGUF itself, or a random-init Llama/Qwen2."""
  import torch
  import transformers

  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.param_dtype]
  if gguf_path:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), torch_dtype=dtype)
  else:
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, intermediate_size=cfg.mlp_dim,
                  rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps,
                  tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_seq_len)
    c = (transformers.Qwen2Config(**common) if cfg.family == "qwen2"
         else transformers.LlamaConfig(head_dim=cfg.head_dim, **common))
    hf = transformers.AutoModelForCausalLM.from_config(c, torch_dtype=dtype)
  return hf.eval()


def main(argv):
  del argv
  jax.config.update("jax_platforms", FLAGS.platform)
  from models import checkpoint

  quick = FLAGS.quick
  new_tokens = FLAGS.new_tokens or (64 if quick else 128)
  repeats = 1 if quick else 2
  if FLAGS.hf:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
  bw = memory_bandwidth()
  peak = matmul_peak(FLAGS.dtype)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"device: {jax.devices()[0].device_kind} ({FLAGS.platform}), {os.cpu_count()} CPU "
        f"threads, load average {load:.1f}; memory bandwidth (512 MB reduction): "
        f"{bw / 1e9:.1f} GB/s; matmul peak (2048^3 {FLAGS.dtype}): {peak / 1e9:.1f} GFLOP/s")
  gguf = None
  if FLAGS.model == "smollm2-gguf":
    gguf = checkpoint.smollm2_gguf_path()
    cfg, params = checkpoint.load_gguf(gguf, FLAGS.dtype)
    cfg = cfg.replace(dtype=FLAGS.dtype)
  else:
    cfg = config_lib.get_config(FLAGS.model, dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)
    params = dec.init_params(cfg, jax.random.PRNGKey(0))
  hf_dev = hf_device(FLAGS.platform) if FLAGS.hf else None
  hf = hf_model_for(cfg, gguf).to(hf_dev) if hf_dev else None
  results: dict[str, object] = {"memory_gb_s": bw / 1e9, "matmul_gflop_s": peak / 1e9,
                                "load_average": load,
                                "model": FLAGS.model, "dtype": FLAGS.dtype,
                                "platform": FLAGS.platform, "hf_device": hf_dev}
  r = decode_throughput(FLAGS.batch, new_tokens, FLAGS.prompt_len, FLAGS.rounds, params, cfg, hf,
                        bw, peak)
  results["decode"] = [r]
  print(f"\ndecode throughput, {FLAGS.model} {FLAGS.dtype}, greedy, batch {FLAGS.batch}, "
        f"prompt {FLAGS.prompt_len}, {new_tokens} new tokens")
  print(f"per step: {r['step_mb']:.0f} MB to read, {r['step_gflop']:.2f} GFLOP; at the measured "
        f"bandwidth and matmul peak the memory roofline fraction is at most "
        f"{r['memory_roofline_cap']:.2f}; the step's matmuls alone take {r['matmul_floor_s'] * 1e3:.0f} "
        f"ms (memory roofline fraction {t_floor_roof(r):.2f} at that floor), ours "
        f"{r['ours_s'] / new_tokens * 1e3:.0f} ms per step")
  print(f"{'engine':>22} {'tok/s':>9} {'roofline':>8} {'of peak':>8} {'ours / it':>9} "
        f"{'prefill s':>9} {'loop ms/step':>12} {'loop roofline':>13}")
  for name, label in [("ours", "ours (filled-only)"), ("hf", "transformers eager"),
                      ("hf_static", "transformers static")]:
    if name == "ours":
      tok_s, roof, peak_frac = r["ours_tok_s"], r["roofline"], r["compute_fraction"]
    elif f"{name}_tok_s" in r:
      tok_s, roof, peak_frac = (r[name + "_tok_s"], r[name + "_roofline"],
                                r[name + "_compute_fraction"])
    else:
      continue
    print(f"{label:>22} {tok_s:9.1f} {roof:8.3f} {peak_frac:8.3f} {r['ours_tok_s'] / tok_s:9.2f} "
          f"{r[name + '_first_s']:9.2f} {r[name + '_loop_step_s'] * 1e3:12.1f} "
          f"{r[name + '_loop_roofline']:13.3f}")
  print(f"(prefill s: the prompt and the first token alone; loop: the other {new_tokens - 1} "
        f"steps, end to end minus that; our loop's step is {r['loop_floor_fraction']:.2f} of the "
        f"matmul floor's time)")
  if FLAGS.profile:
    print(f"\nour decode loop, jax.profiler trace in {FLAGS.profile}: XLA op kinds by thread time "
          f"(summed over threads, so more than the wall time)")
    print(f"{'op kind':>40} {'ms/step':>8} {'calls/step':>10}")
    for kind, ms, calls in profile_decode(params, cfg, FLAGS.batch, FLAGS.prompt_len, new_tokens,
                                          FLAGS.profile):
      print(f"{kind[:40]:>40} {ms:8.2f} {calls:10.1f}")
  del hf
  c = compaction(params, cfg, FLAGS.batch, FLAGS.prompt_len, 2 * new_tokens,
                 FLAGS.compact_every, repeats)
  results["compaction"] = c
  print(f"\nfinished rows stop costing: batch {c['batch']}, lognormal lengths (mean "
        f"{c['mean_len']:.0f}, max {c['max_len']} of {c['new_tokens']}), compaction every "
        f"{c['every']} steps")
  print(f"{'one loop tok/s':>14} {'compacted tok/s':>15} {'speedup':>7}")
  print(f"{c['one_loop_tok_s']:14.1f} {c['compact_tok_s']:15.1f} {c['speedup']:7.2f}")
  summary = {"decode_tok_s": r["ours_tok_s"], "roofline_fraction": r["roofline"],
             "loop_roofline_fraction": r["ours_loop_roofline"],
             "memory_roofline_cap": r["memory_roofline_cap"],
             "compute_fraction": r["compute_fraction"], "floor_fraction": r["floor_fraction"],
             "compaction_speedup": c["speedup"]}
  if "hf_tok_s" in r:
    summary["decode_speedup_vs_hf"] = r["ours_tok_s"] / r["hf_tok_s"]
    summary["decode_speedup_vs_hf_static"] = r["ours_tok_s"] / r["hf_static_tok_s"]
    summary["hf_roofline_fraction"] = r["hf_roofline"]
    summary["hf_loop_roofline_fraction"] = r["hf_loop_roofline"]
  if FLAGS.summary:
    tiny = config_lib.get_config("tiny", vocab_size=512)
    tiny_params = dec.init_params(tiny, jax.random.PRNGKey(0))
    sums = []
    shapes = [("tiny", tiny, tiny_params, 16 if not quick else 8)]
    shapes.append((FLAGS.model, cfg, params, 2 if not quick else 1))
    for name, c_, p, n_rows in shapes:
      s = summary_phase(p, c_, n_rows, 512, 4, 4, 32, 32, repeats)
      s["model"] = name
      sums.append(s)
    print("\nsummary phase: m=4, A=4, b_max=512, S=32, every cut a running cut")
    print(f"{'model':>13} {'rows':>4} {'branches':>8} {'shared s':>8} {'reprefill s':>11} "
          f"{'speedup':>7} {'shared MB':>9} {'reprefill MB':>12} {'mem ratio':>9}")
    for s in sums:
      print(f"{s['model'][:13]:>13} {s['rows']:>4} {s['branches']:>8} {s['shared_s']:8.2f} "
            f"{s['reprefill_s']:11.2f} {s['speedup']:7.2f} {s['shared_mem_mb']:9.1f} "
            f"{s['reprefill_mem_mb']:12.1f} {s['mem_ratio']:9.3f}")
    results["summary_phase"] = sums
    summary["summary_speedup_vs_reprefill"] = min(s["speedup"] for s in sums)
    summary["summary_peak_mem_ratio"] = max(s["mem_ratio"] for s in sums)
  results["summary"] = summary
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)
  sys.stdout.flush()
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
