"""XLA's memory figure of the paper-shape update, ahead of time, on CPU, without weights.

  python -m benchmarks.memory [--remat=full] [--scan_layers=true] [--b_max=8000,2048] [--quick]
  python -m benchmarks.memory --target=tpu:v4-8 [--fit]   # XLA:TPU, from this host: benchmarks/fit.py

The update of experiments/configs/deepseek_r1_1.5b_math.flags is compiled from ShapeDtypeStruct
inputs (`jax.jit(train_step).lower(state, batch).compile().memory_analysis()`): the
DeepSeek-R1-Distill-Qwen-1.5B config, bfloat16 compute, float32 parameters, AdamW with gradient
clipping, packed rows of prompt 1024 + b_max thinking + m * A branches of (inserted + S) slots
(m=4, A=4, S=128), one packed row per device per micro-batch, over a mini-batch of 32 prompts x 8
thinkings. Two layouts: one device, and an fsdp=8 mesh of 8 fake CPU devices (XLA_FLAGS is set
before jax is imported). Per device: arguments + outputs + temporaries - donated aliases, in GB
(1e9 bytes). The last line is one JSON object.

CPU figures are XLA:CPU's buffer assignment: a GPU compile schedules differently (and keeps
bfloat16 matmuls in bfloat16), so read them as the design check they are, not as a GPU measurement.
The rollout is compiled the same way (`rollout_memory`): the three programs of one sampler call
(`sampling.prefill_jit`, the thinking's `sampling.decode_jit` loop, the summaries'
`anytime.decode_branches`) on a chunk of `--rollout_batch` rows of prompt + b_max thinking with
m * A branches of (inserted + S) slots, per-row keys, the parameters in the decoding layout
(`models.params.for_decoding`: per layer, matrices in bfloat16). Its peak is the largest of the three; on one
device the training state that stays resident during the rollout (the scanned parameters and the
Adam moments, `--init`'s figure) is added. On the fsdp mesh the paper flagfile's 512 rows are
rolled out in one call (64 per device): the KV cache is sharded explicitly (rows over fsdp).
Also printed: the KV-cache bytes per row and how many rows fit in 80 GB beside the parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import tpu_aot  # noqa: E402
from brpo.rollout import anytime as at  # noqa: E402
from brpo.rollout import sampling  # noqa: E402
from brpo import rows as rows_lib  # noqa: E402
from brpo.run import config as run_config  # noqa: E402
from brpo.train import packing as pk  # noqa: E402
from brpo.train import step as train_lib  # noqa: E402
from models import config as model_configs  # noqa: E402
from models import params as param_lib  # noqa: E402
from models import sharding as shd  # noqa: E402

GB = 1e9


def packed_shape(prompt_len: int, b_max: int, m: int, a: int, s: int, n_insert: int):
  """(slots T, trunk length, branches, branch width) of a packed row (brpo.train.packing)."""
  w = n_insert + s
  trunk = prompt_len + b_max
  return pk.padded_length(trunk + m * a * w), trunk, m * a, w


def abstract_batch(rows: int, t: int, prompt_len: int, trunk: int, c: int, w: int,
                   sharding=None) -> pk.PackedBatch:
  sds = lambda dt: jax.ShapeDtypeStruct((rows, t), dt, sharding=sharding)
  return pk.PackedBatch(
      tokens=sds(jnp.int32), positions=sds(jnp.int32), branch=sds(jnp.int32),
      limit=sds(jnp.int32), loss_mask=sds(jnp.bool_), old_logp=sds(jnp.float32),
      advantages=sds(jnp.float32), is_summary=sds(jnp.bool_), prompt_len=prompt_len,
      trunk_len=trunk, n_branches=c, branch_width=w)


def abstract_state(cfg, optimizer, mesh) -> train_lib.TrainState:
  params = param_lib.abstract_params(cfg)
  shardings = train_lib.state_shardings(params, param_lib.param_axes(cfg), optimizer, mesh)
  opt = jax.eval_shape(optimizer.init, params)
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return train_lib.TrainState(
      params=jax.tree.map(with_sharding, params, shardings.params),
      opt_state=jax.tree.map(with_sharding, opt, shardings.opt_state),
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
      rng=with_sharding(jax.eval_shape(lambda: jax.random.PRNGKey(0)), shardings.rng))


def _compile(lowered, what: str):
  return lowered.compile()


def update_memory(cfg, ec: run_config.ExperimentConfig, mesh, rows_per_device: int, t: int,
                  trunk: int, c: int, w: int, compile_fn=_compile) -> dict:
  """Compiles the update of one mini-batch on `mesh`; returns XLA's memory figures per device.
  compile_fn(lowered, what) compiles (benchmarks.fit: XLA:TPU under an HBM limit)."""
  rl, oc = ec.rl, ec.optim
  n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = rl.mini_batch_prompts * rl.group_size
  micro = rows // (rows_per_device * n_dev)
  rl = run_config.RLConfig(**{**rl.__dict__, "micro_batches": micro})
  updates = rl.ppo_epochs * (rl.prompts_per_batch // rl.mini_batch_prompts)
  optimizer = train_lib.make_optimizer(oc, ec.run.steps * updates, cfg)
  step = train_lib.make_train_step(cfg, optimizer, rl, trunk + c * w - ec.model.max_prompt_len,
                                   mesh)
  state = abstract_state(cfg, optimizer, mesh)
  batch = abstract_batch(rows, t, ec.model.max_prompt_len, trunk, c, w,
                         shd.batch_sharding(mesh, 2))
  t0 = time.time()
  compiled = compile_fn(step.lower(state, batch), "update")
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  return dict(peak_gb=peak / GB, argument_gb=mem.argument_size_in_bytes / GB,
              output_gb=mem.output_size_in_bytes / GB, temp_gb=mem.temp_size_in_bytes / GB,
              alias_gb=mem.alias_size_in_bytes / GB, rows=rows, micro_batches=micro,
              rows_per_micro_batch=rows // micro, slots=t, compile_s=time.time() - t0)


_ENTRY_PARAM = re.compile(r"^\s*%(\S+) = bf16\[[\d,]*\]\S* parameter\(")
_ENTRY_CONVERT = re.compile(r"^\s*%wrapped_convert[.\d]* = f32\[([\d,]*)\]\S* fusion\(%([^)]*)\)")


def cpu_upcast_gb(compiled) -> float:
  """GB of float32 copies of whole bfloat16 arguments made in `compiled`'s entry computation
  (converts of anything else are not counted, nor are copies of gathered shards): XLA:CPU has no
  bfloat16 matmul, converts each bfloat16 weight (and, in the summary loop, the trunk cache) to
  float32, and hoists those loop-invariant converts out of the decode loops, where they stay alive
  for the whole loop. A GPU multiplies in bfloat16 and makes none of them."""
  total, entry, params = 0, False, set()
  for line in compiled.as_text().splitlines():
    entry = entry or line.startswith("ENTRY")
    if not entry:
      continue
    p = _ENTRY_PARAM.match(line)
    if p:
      params.add(p.group(1))
    m = _ENTRY_CONVERT.match(line)
    if m and m.group(2) in params:  # a whole argument, not an activation (those are transient)
      total += 4 * math.prod(int(d) for d in m.group(1).split(",") if d)
  return total / GB


def _peak(compiled, cpu: bool = True) -> dict:
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  up = cpu_upcast_gb(compiled) if cpu else 0.0
  return dict(peak_gb=peak / GB, argument_gb=mem.argument_size_in_bytes / GB,
              temp_gb=mem.temp_size_in_bytes / GB, output_gb=mem.output_size_in_bytes / GB,
              cpu_upcast_gb=up, without_upcast_gb=peak / GB - up)


def rollout_memory(cfg, mesh, rows: int, prompt_len: int, b_max: int, m: int, a: int, s: int,
                   n_insert: int, compile_fn=_compile) -> dict:
  """Compiles one sampler call of `rows` thinkings on `mesh` (prefill, the thinking loop, the
  branch loop); returns XLA's memory figures per device for each and their maximum.
  compile_fn(lowered, what): as for update_memory."""
  params, dcfg = param_lib.for_decoding(param_lib.abstract_params(cfg, mesh), cfg)
  rows_of = lambda shape, dt: jax.ShapeDtypeStruct(
      (rows,) + shape, dt, sharding=rows_lib.row_sharding(mesh, rows, 1 + len(shape)))
  strategy = sampling.Temperature(1.0)
  stops = jax.ShapeDtypeStruct((2, 1), jnp.int32)  # `</think>`, end of sequence
  keys = rows_of((2,), jnp.uint32)
  mesh_arg = mesh if mesh.size > 1 else None
  t0 = time.time()
  prefill = compile_fn(sampling.prefill_jit.lower(
      params, dcfg, rows_of((prompt_len,), jnp.int32), rows_of((prompt_len,), jnp.bool_), stops,
      keys, None, n_new=b_max, strategy=strategy, pad_id=0, mesh=mesh_arg), "prefill")
  state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                       jax.eval_shape(lambda: prefill.out_info), prefill.output_shardings)
  decode = compile_fn(sampling.decode_jit.lower(params, dcfg, state, stops, None,
                                                strategy=strategy, pad_id=0, write_last=True,
                                                mesh=mesh_arg), "thinking loop")
  c = m * a
  branches = compile_fn(at.decode_branches.lower(
      params, dcfg, state.cache, state.start, state.n_prompt, rows_of((c,), jnp.int32),
      rows_of((c, n_insert), jnp.int32), rows_of((c,), jnp.int32), rows_of((c,), jnp.bool_),
      rows_of((c, 2), jnp.uint32), prompt_len=prompt_len, summary_len=s, strategy=strategy,
      eos_id=1, pad_id=0, mesh=mesh_arg), "summary loop")
  cpu = mesh.devices.flat[0].platform == "cpu"
  out = {name: _peak(x, cpu) for name, x in
         (("prefill", prefill), ("thinking", decode), ("summaries", branches))}
  cache = state.cache.k[0]
  per_dev = cache.sharding.shard_shape(cache.shape)[0] if cache.sharding else rows
  return dict(phases=out, peak_gb=max(v["peak_gb"] for v in out.values()),
              without_upcast_gb=max(v["without_upcast_gb"] for v in out.values()),
              params_gb=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / GB,
              rows=rows, cache_rows_per_device=per_dev, compile_s=time.time() - t0)


def kv_cache_report(cfg, prompt_len: int, b_max: int, state_gb_1dev: float, hbm_gb: float = 80):
  """Bytes of the rollout's bfloat16 KV cache per row (prompt + thinking) and rows that fit."""
  per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # k and v, bfloat16
  per_row = per_token * (prompt_len + b_max)
  params_gb = cfg.n_params * 4 / GB  # float32 parameters
  return dict(kv_bytes_per_token=per_token, kv_gb_per_row=per_row / GB, params_gb=params_gb,
              rows_in_80gb_beside_params=int((hbm_gb - params_gb) * GB // per_row),
              rows_in_80gb_beside_train_state_1dev=int((hbm_gb - state_gb_1dev) * GB // per_row),
              rows_needed=64 * 8)


def at_shape(ec: run_config.ExperimentConfig, prompt_len: int,
             b_max: int) -> run_config.ExperimentConfig:
  """The run `ec` with prompts of `prompt_len` and thinkings of `b_max`."""
  return dataclasses.replace(
      ec, model=dataclasses.replace(ec.model, max_prompt_len=prompt_len),
      rl=dataclasses.replace(ec.rl, b_max=b_max))


def ragged_report(cfg, ec: run_config.ExperimentConfig, mesh, args, b_max: int):
  """The one-device update at the full packed width T and at the next narrower widths of
  `--pack_buckets` (brpo.train.packing.bucket_widths): the memory a step whose longest row fits
  one of them compiles to. (XLA's flop count is not printed: it counts a loop body once, and the
  log-prob chunks, a divisor of the width, change size with it.)"""
  rl = ec.rl
  m, a, s = rl.n_budgets, rl.n_summaries, rl.summary_len
  t, trunk, c, w = packed_shape(args.prompt_len, b_max, m, a, s, args.n_insert)
  widths = pk.bucket_widths(t, rl.pack_buckets, cfg.attention_block)[::-1][:args.ragged + 1]
  ec_b = at_shape(ec, args.prompt_len, b_max)
  rows, out = [], {}
  for width in widths:
    r = update_memory(cfg, ec_b, mesh, args.rows_per_device, width, trunk, c, w)
    rows.append(r)
    first = rows[0]
    print(f"b_max={b_max} width {width:6d} of T={t} ({width / t:.3f}): {r['peak_gb']:6.2f} GB "
          f"one device ({r['peak_gb'] / first['peak_gb']:.3f}x; temporaries "
          f"{r['temp_gb']:.2f} GB); compiled in {r['compile_s']:.0f} s", flush=True)
    out[f"ragged_w{width}_gb"] = round(r["peak_gb"], 2)
  print(json.dumps(out))
  return out, {"ragged": rows}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--flagfile", default="experiments/configs/deepseek_r1_1.5b_math.flags",
                  help="the run whose optimizer, batch sizes and --remat/--scan_layers are used")
  ap.add_argument("--model", default="deepseek-r1-distill-qwen-1.5b")
  ap.add_argument("--remat", default="", help="override the flagfile's --remat")
  ap.add_argument("--scan_layers", default="", help="override the flagfile's --scan_layers")
  ap.add_argument("--b_max", default="8000,2048", help="comma-separated thinking budgets")
  ap.add_argument("--prompt_len", type=int, default=1024)
  ap.add_argument("--n_insert", type=int, default=12,
                  help="inserted tokens before a summary (the R1 template's cut text)")
  ap.add_argument("--rows_per_device", type=int, default=1, help="packed rows per device per "
                  "micro-batch")
  ap.add_argument("--devices", type=int, default=8, help="the fsdp mesh's size")
  ap.add_argument("--rollout_batch", type=int, default=None,
                  help="rows per sampler call: on the CPU's one device (default 128; the fsdp "
                  "mesh rolls out all 512); with --target=tpu:... (default 0: all rows)")
  ap.add_argument("--target", default="cpu", help="cpu (XLA:CPU, the one-device and fsdp "
                  "layouts above), or tpu:<name> (XLA:TPU for a topology, from this host: "
                  f"{', '.join(tpu_aot.TOPOLOGIES)}, or libtpu's names such as v5e:2x2); "
                  "benchmarks/fit.py")
  ap.add_argument("--fit", action="store_true", help="search the settings that fit the "
                  "target's HBM (benchmarks/fit.py); on cpu needs --hbm_gb")
  ap.add_argument("--hbm_gb", type=float, default=0, help="HBM per device in GB (1e9 bytes) "
                  "for --target/--fit instead of XLA:TPU's own limit")
  ap.add_argument("--mesh", default="1,-1,1", help="--target: the mesh (data,fsdp,tensor)")
  ap.add_argument("--fit_mesh", default="1,-1,1",
                  help="--fit: meshes to try in order, separated by ;")
  ap.add_argument("--fit_remat", default="none,dots,full",
                  help="--fit: rematerialisations to try in order (least first)")
  ap.add_argument("--skip_rollout", action="store_true", help="only the update")
  ap.add_argument("--quick", action="store_true", help="only the one-device case at 2048")
  ap.add_argument("--ragged", type=int, default=0, metavar="K",
                  help="only the one-device update at the largest b_max, at the full width and "
                  "at the K next narrower widths of --pack_buckets (ragged rows)")
  args = ap.parse_args(argv)

  from experiments import gsm_math

  if args.fit and args.target == "cpu" and args.hbm_gb <= 0:
    raise SystemExit("--fit with --target=cpu needs --hbm_gb (XLA:CPU has no HBM limit)")
  extra = []
  if args.remat:
    extra.append(f"--remat={args.remat}")
  if args.scan_layers:
    extra.append(f"--scan_layers={args.scan_layers}")
  try:
    ec = gsm_math.config_from_args([f"--flagfile={args.flagfile}", "--init=random",
                                    f"--model={args.model}", *extra])
  except ValueError as e:
    raise SystemExit(str(e)) from None
  cfg = model_configs.get_config(args.model, dtype=ec.model.dtype,
                                 param_dtype=ec.model.param_dtype, remat=ec.model.remat,
                                 scan_layers=ec.model.scan_layers)
  if args.target != "cpu" or args.fit:
    from benchmarks import fit
    return fit.main(args, ec), {}
  rl = ec.rl
  m, a, s = rl.n_budgets, rl.n_summaries, rl.summary_len
  print(f"{args.model}: {cfg.n_params / 1e9:.2f}B parameters ({cfg.param_dtype}), compute "
        f"{cfg.dtype}, remat={cfg.remat}, scan_layers={cfg.scan_layers}; m={m}, A={a}, S={s}, "
        f"prompt {args.prompt_len}, {args.n_insert} inserted tokens; mini-batch "
        f"{rl.mini_batch_prompts} x {rl.group_size} rows; {jax.device_count()} CPU devices")
  one = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  fsdp = shd.make_mesh((1, args.devices, 1), devices=jax.devices()[:args.devices])
  budgets = [int(b) for b in args.b_max.split(",")]
  if args.quick:
    budgets, meshes = [min(budgets)], {"1dev": one}
  else:
    meshes = {"1dev": one, f"fsdp{args.devices}": fsdp}
  out, details = {}, {}
  if args.ragged:
    return ragged_report(cfg, ec, one, args, max(budgets))
  for b_max in budgets:
    t, trunk, c, w = packed_shape(args.prompt_len, b_max, m, a, s, args.n_insert)
    for name, mesh in meshes.items():
      ec_b = at_shape(ec, args.prompt_len, b_max)
      r = update_memory(cfg, ec_b, mesh, args.rows_per_device, t, trunk, c, w)
      details[f"b{b_max}_{name}"] = r
      print(f"b_max={b_max:5d} T={t:6d} {name:>6}: {r['peak_gb']:6.2f} GB per device "
            f"(arguments {r['argument_gb']:.2f}, outputs {r['output_gb']:.2f}, temporaries "
            f"{r['temp_gb']:.2f}, donated {r['alias_gb']:.2f}); {r['rows']} rows in "
            f"{r['micro_batches']} micro-batches of {r['rows_per_micro_batch']}; compiled in "
            f"{r['compile_s']:.0f} s", flush=True)
      suffix = "" if b_max == 8000 else f"_b{b_max}"
      key = "paper_train_gb_1dev" if name == "1dev" else f"paper_train_gb_per_dev_{name}"
      out[key + suffix] = round(r["peak_gb"], 2)
  state_gb = details.get("b8000_1dev", next(iter(details.values())))["argument_gb"]
  kv = kv_cache_report(cfg, args.prompt_len, max(budgets), state_gb)
  print(f"rollout KV cache (bfloat16): {kv['kv_bytes_per_token']} bytes per token, "
        f"{kv['kv_gb_per_row']:.3f} GB per row of {args.prompt_len} + {max(budgets)} tokens; in "
        f"80 GB beside the float32 parameters ({kv['params_gb']:.1f} GB): "
        f"{kv['rows_in_80gb_beside_params']} rows; beside the whole train state on one device "
        f"({state_gb:.1f} GB): {kv['rows_in_80gb_beside_train_state_1dev']} rows "
        f"(the paper's batch: {kv['rows_needed']} thinkings)")
  if not args.skip_rollout:
    b_max, n_rows = max(budgets), kv["rows_needed"]
    chunk = args.rollout_batch or 128
    chunks = {"1dev": (one, chunk)} if args.quick else {
        "1dev": (one, chunk), f"fsdp{args.devices}": (fsdp, n_rows)}
    # Resident during the rollout besides its own buffers: on one device the scanned float32
    # parameters and the Adam moments (the update's arguments, less the batch).
    resident = {"1dev": details[f"b{max(budgets)}_1dev"]["argument_gb"] if
                f"b{max(budgets)}_1dev" in details else 0.0}
    for name, (mesh, n) in chunks.items():
      r = rollout_memory(cfg, mesh, n, args.prompt_len, b_max, m, a, s, args.n_insert)
      details[f"rollout_{name}"] = r
      res = resident.get(name, 0.0)
      phases = ", ".join(f"{k} {v['peak_gb']:.2f} ({v['without_upcast_gb']:.2f})"
                         for k, v in r["phases"].items())
      print(f"rollout b_max={b_max} {name:>6}: parameters {r['params_gb']:.2f} GB; {n} rows per "
            f"sampler call ({-(-n_rows // n)} calls for {n_rows} thinkings), "
            f"{r['cache_rows_per_device']} rows' KV cache per device; XLA:CPU peak per device "
            f"{r['peak_gb']:.2f} GB, without its float32 copies of bfloat16 arguments "
            f"{r['without_upcast_gb']:.2f} GB (per phase: {phases})"
            + (f"; + {res:.2f} GB of resident training state = {r['peak_gb'] + res:.2f} GB "
               f"({r['without_upcast_gb'] + res:.2f} GB)" if name in resident else "")
            + f"; compiled in {r['compile_s']:.0f} s", flush=True)
      suffix = "" if b_max == 8000 else f"_b{b_max}"
      out[f"paper_rollout_gb_{name}{suffix}"] = round(r["peak_gb"] + res, 2)
      out[f"paper_rollout_gb_{name}_without_cpu_upcast{suffix}"] = round(
          r["without_upcast_gb"] + res, 2)
    out["rollout_batch_1dev"] = chunk
  out.update(remat=cfg.remat, scan_layers=cfg.scan_layers,
             kv_gb_per_row=round(kv["kv_gb_per_row"], 4),
             rollout_rows_in_80gb_beside_params=kv["rows_in_80gb_beside_params"])
  print(json.dumps(out))
  return out, details


if __name__ == "__main__":
  main(sys.argv[1:])
