"""`python -m benchmarks.memory --target=tpu:<name> [--fit]`: the paper-shape update and rollout
compiled by XLA:TPU for a TPU topology from this CPU host, and the settings that fit its HBM.

  python -m benchmarks.memory --target=tpu:v4-8 --b_max=8000          # figures at the flags given
  python -m benchmarks.memory --target=tpu:v4-8 --b_max=8000 --fit    # the settings that fit
  python -m benchmarks.memory --target=cpu --fit --hbm_gb=0.02 ...    # a made-up HBM, on XLA:CPU

Per device, from `memory_analysis()` of the compiled programs (arguments + outputs + temporaries
- donated aliases): the update of one mini-batch (benchmarks.memory.update_memory) and the three
programs of one sampler call (prefill, thinking loop, summary loop; rollout_memory), and the
training state that stays resident during the rollout (float32 parameters, Adam moments: their
shard on one device). The rollout fits when each of its programs compiles within HBM less that
resident state. XLA:TPU checks the limit itself (a refusal is one line: "does not fit: needs X of
Y GB"); HBM is XLA:TPU's own limit per device (benchmarks.tpu_aot.available_hbm) or --hbm_gb.
These are compile-time memory figures, not measurements on a TPU, and say nothing of speed.

--fit searches, compiling each candidate, for the least extra work: per mesh (--fit_mesh, in
order), the least rematerialisation (--fit_remat, in order) whose update fits with one packed row
per device per micro-batch, then the most rows per device (fewest micro-batches; the next sizes
are predicted from the first two, linear in rows, and checked by compiling); the rollout's
largest chunk (--rollout_batch: all rows, then halves) whose programs fit beside the resident
state. It prints the flags and one JSON line {"target", "hbm_gb", "update_gb", "rollout_gb",
"resident_gb", "fits", "flags", ...}.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import jax

from benchmarks import memory as mem
from benchmarks import tpu_aot
from brpo import rows as rows_lib
from brpo.run import config as run_config
from brpo.train import step as train_lib
from models import config as model_configs
from models import sharding as shd

GB = mem.GB
DoesNotFit = tpu_aot.DoesNotFit


@dataclasses.dataclass
class Target:
  name: str  # "tpu:v4-8", "cpu"
  devices: list
  hbm: float | None  # bytes per device a program may use (None: no limit)
  tpu: bool

  def compile_fn(self, limit: float | None):
    """compile_fn of benchmarks.memory under `limit` bytes per device: XLA:TPU enforces it;
    every figure is also checked against it (arguments + outputs + temporaries - aliases)."""
    def fn(lowered, what):
      compiled = (tpu_aot.compile(lowered, limit, what) if self.tpu
                  else lowered.compile())
      if limit is not None:
        needs = mem._peak(compiled, cpu=False)["peak_gb"] * GB
        if needs > limit:
          raise DoesNotFit(needs, limit, what)
      return compiled
    return fn


def make_target(spec: str, n_cpu: int, hbm_gb: float) -> Target:
  """--target (cpu or tpu:<name>) -> its devices and HBM (--hbm_gb > 0 overrides XLA's)."""
  hbm = hbm_gb * GB if hbm_gb > 0 else None
  if spec == "cpu":
    return Target("cpu", jax.devices()[:n_cpu], hbm, False)
  if not spec.startswith("tpu:"):
    raise ValueError(f"--target={spec}: expected cpu or tpu:<name> (e.g. tpu:v5p-8)")
  devices = tpu_aot.devices(spec[4:])
  return Target(spec, devices, hbm or tpu_aot.available_hbm(devices), True)


def model_config(ec: run_config.ExperimentConfig, model: str, remat: str):
  return model_configs.get_config(model, dtype=ec.model.dtype, param_dtype=ec.model.param_dtype,
                                  remat=remat, scan_layers=ec.model.scan_layers)


def resident_bytes(cfg, ec: run_config.ExperimentConfig, mesh) -> float:
  """Bytes per device of the training state (parameters, Adam moments, step, key) on `mesh`:
  alive through the rollout."""
  rl = ec.rl
  updates = rl.ppo_epochs * (rl.prompts_per_batch // rl.mini_batch_prompts)
  optimizer = train_lib.make_optimizer(ec.optim, ec.run.steps * updates, cfg)
  state = mem.abstract_state(cfg, optimizer, mesh)
  return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(state)))


@dataclasses.dataclass(frozen=True)
class Shape:
  """The run's shape: prompt, b_max, and the packed row (benchmarks.memory.packed_shape)."""
  prompt_len: int
  b_max: int
  n_insert: int

  def packed(self, rl):
    return mem.packed_shape(self.prompt_len, self.b_max, rl.n_budgets, rl.n_summaries,
                            rl.summary_len, self.n_insert)


def update_at(target, ec, model, remat, mesh, shape, rows_per_device, limit):
  """The update's figures (a dict) or the DoesNotFit."""
  cfg = model_config(ec, model, remat)
  t, trunk, c, w = shape.packed(ec.rl)
  try:
    return mem.update_memory(cfg, mem.at_shape(ec, shape.prompt_len, shape.b_max), mesh,
                             rows_per_device, t, trunk, c, w, target.compile_fn(limit))
  except DoesNotFit as e:
    return e


def rollout_at(target, ec, model, mesh, shape, rows, limit):
  """One sampler call's figures (a dict) or the DoesNotFit of its first refused program."""
  rl = ec.rl
  cfg = model_config(ec, model, ec.model.remat)
  try:
    return mem.rollout_memory(cfg, mesh, rows, shape.prompt_len, shape.b_max, rl.n_budgets,
                              rl.n_summaries, rl.summary_len, shape.n_insert,
                              target.compile_fn(limit))
  except DoesNotFit as e:
    return e


def _log(msg: str):
  print(msg, flush=True)


def _describe(r) -> str:
  if isinstance(r, DoesNotFit):
    return str(r)
  if "phases" in r:
    phases = ", ".join(f"{k} {v['peak_gb']:.2f}" for k, v in r["phases"].items())
    return f"{r['peak_gb']:.2f} GB per device ({phases}); compiled in {r['compile_s']:.0f} s"
  return (f"{r['peak_gb']:.2f} GB per device ({r['micro_batches']} micro-batches of "
          f"{r['rows_per_micro_batch']} rows; temporaries {r['temp_gb']:.2f}); compiled in "
          f"{r['compile_s']:.0f} s")


def search_update(target, ec, model, remats, mesh, shape, limit):
  """(remat, figures) of the least remat whose update fits, at the most rows per device; None."""
  rows = ec.rl.mini_batch_prompts * ec.rl.group_size
  ways = rows_lib.batch_ways(mesh)
  if rows % ways:
    return None
  options = [d for d in range(1, rows // ways + 1) if (rows // ways) % d == 0]
  for remat in remats:
    tried = {}

    def at(d):
      tried[d] = update_at(target, ec, model, remat, mesh, shape, d, limit)
      _log(f"  update remat={remat} rows/device={d}: {_describe(tried[d])}")
      return not isinstance(tried[d], DoesNotFit)

    if not at(options[0]):
      continue
    best = options[0]
    if len(options) > 1 and at(options[1]):
      best = options[1]
      p1, p2 = tried[options[0]]["peak_gb"] * GB, tried[options[1]]["peak_gb"] * GB
      slope = (p2 - p1) / (options[1] - options[0])
      larger = [d for d in options if d > best]
      if slope > 0 and limit is not None:  # the largest predicted to fit first, then down
        most = best + (limit - p2) / slope
        for d in sorted((d for d in larger if d <= most), reverse=True):
          if at(d):
            best = d
            break
      else:  # fixed costs dominate (tiny rows): up one size at a time
        for d in larger:
          if not at(d):
            break
          best = d
    return remat, tried[best]
  return None


def search_rollout(target, ec, model, mesh, shape, limit):
  """(rows per call, figures) of the largest chunk whose three programs fit; None."""
  rows = ec.rl.prompts_per_batch * ec.rl.group_size
  ways = rows_lib.batch_ways(mesh)
  n = rows
  while n >= ways and n % ways == 0:
    r = rollout_at(target, ec, model, mesh, shape, n, limit)
    _log(f"  rollout {n} rows per sampler call: {_describe(r)}")
    if not isinstance(r, DoesNotFit):
      return n, r
    n //= 2
  return None


def _gb(x: float | None):
  return None if x is None else round(x / GB, 2)


def fit(target, ec, model, shape, meshes, remats) -> dict:
  """The --fit search for one b_max: the first mesh on which both the update and the rollout
  fit (or the last mesh's partial result, fits false)."""
  rl = ec.rl
  for shape_ in meshes:
    mesh = shd.make_mesh(shape_, devices=target.devices)
    resident = resident_bytes(model_config(ec, model, ec.model.remat), ec, mesh)
    mesh_flag = ",".join(map(str, shape_))
    _log(f"{target.name} b_max={shape.b_max} mesh {mesh_flag} ({dict(mesh.shape)}): HBM "
         f"{_gb(target.hbm)} GB per device, resident training state {resident / GB:.2f} GB")
    upd = search_update(target, ec, model, remats, mesh, shape, target.hbm)
    roll_limit = None if target.hbm is None else target.hbm - resident
    roll = search_rollout(target, ec, model, mesh, shape, roll_limit)
    flags = [f"--mesh={mesh_flag}"]
    if upd:
      flags += [f"--remat={upd[0]}", f"--scan_layers={str(ec.model.scan_layers).lower()}",
                f"--micro_batches={upd[1]['micro_batches']}"]
    if roll:
      flags.append(f"--rollout_batch={0 if roll[0] == rl.prompts_per_batch * rl.group_size else roll[0]}")
    out = dict(target=target.name, hbm_gb=_gb(target.hbm),
               update_gb=_gb(upd[1]["peak_gb"] * GB) if upd else None,
               rollout_gb=_gb(roll[1]["peak_gb"] * GB) if roll else None,
               resident_gb=_gb(resident), fits=bool(upd and roll), flags=flags,
               b_max=shape.b_max, devices=len(target.devices),
               processes=len({d.process_index for d in target.devices}),
               rollout_phases_gb={k: round(v["peak_gb"], 2) for k, v in
                                  roll[1]["phases"].items()} if roll else None,
               rollout_calls=-(-rl.prompts_per_batch * rl.group_size // roll[0]) if roll else None,
               model=model)
    if out["fits"]:
      break
  return out


def report(target, ec, model, shape, mesh_shape, rows_per_device, rollout_rows,
           skip_rollout=False) -> dict:
  """The figures at the given settings (no search), refusals as one line each."""
  rl = ec.rl
  mesh = shd.make_mesh(mesh_shape, devices=target.devices)
  resident = resident_bytes(model_config(ec, model, ec.model.remat), ec, mesh)
  n = rollout_rows or rl.prompts_per_batch * rl.group_size
  upd = update_at(target, ec, model, ec.model.remat, mesh, shape, rows_per_device, target.hbm)
  _log(f"{target.name} b_max={shape.b_max} update, remat={ec.model.remat}: {_describe(upd)}")
  ok = lambda r: not isinstance(r, DoesNotFit)
  limit = None if target.hbm is None else target.hbm - resident
  if skip_rollout:
    roll = DoesNotFit(0, 0, "rollout (--skip_rollout: not compiled)")
  else:
    roll = rollout_at(target, ec, model, mesh, shape, n, limit)
    _log(f"{target.name} b_max={shape.b_max} rollout, {n} rows per sampler call, beside "
         f"{resident / GB:.2f} GB of resident training state: {_describe(roll)}")
  return dict(target=target.name, hbm_gb=_gb(target.hbm), b_max=shape.b_max,
              update_gb=round(upd["peak_gb"], 2) if ok(upd) else str(upd),
              rollout_gb=round(roll["peak_gb"], 2) if ok(roll) else str(roll),
              rollout_phases_gb={k: round(v["peak_gb"], 2) for k, v in roll["phases"].items()}
              if ok(roll) else None, resident_gb=_gb(resident), fits=ok(upd) and ok(roll),
              flags=[f"--mesh={','.join(map(str, mesh_shape))}", f"--remat={ec.model.remat}",
                     f"--micro_batches={upd['micro_batches']}" if ok(upd) else "",
                     f"--rollout_batch={rollout_rows}"], devices=len(target.devices),
              processes=len({d.process_index for d in target.devices}), model=model)


def parse_meshes(spec: str) -> list[tuple[int, int, int]]:
  meshes = []
  for part in spec.split(";"):
    try:
      shape = tuple(int(x) for x in part.split(","))
    except ValueError:
      shape = ()
    if len(shape) != 3:
      raise ValueError(f"--fit_mesh={spec}: expected data,fsdp,tensor sizes (e.g. 1,-1,1), "
                       "several separated by ;")
    meshes.append(shape)
  return meshes


def main(args, ec: run_config.ExperimentConfig) -> list[dict]:
  """--target / --fit of benchmarks.memory (its parsed args, the run's config)."""
  try:
    target = make_target(args.target, args.devices, args.hbm_gb)
    meshes = parse_meshes(args.fit_mesh if args.fit else args.mesh)
    for m in meshes:
      shd.make_mesh(m, devices=target.devices)
  except (ValueError, tpu_aot.LibtpuMissing) as e:
    raise SystemExit(str(e)) from None
  remats = [r for r in args.fit_remat.split(",") if r]
  bad = [r for r in remats if r not in model_configs.REMAT_MODES]
  if bad:
    raise SystemExit(f"--fit_remat={args.fit_remat}: expected some of "
                     f"{', '.join(model_configs.REMAT_MODES)}")
  procs = len({d.process_index for d in target.devices})
  _log(f"{target.name}: {len(target.devices)} devices ({target.devices[0].device_kind}) on "
       f"{procs} host(s); HBM per device {_gb(target.hbm)} GB"
       + (" (--hbm_gb)" if args.hbm_gb > 0 else " (XLA's limit)" if target.tpu else ""))
  outs = []
  for b_max in [int(b) for b in args.b_max.split(",")]:
    shape = Shape(args.prompt_len, b_max, args.n_insert)
    if args.fit:
      out = fit(target, ec, args.model, shape, meshes, remats)
      for flag in out["flags"]:
        print(flag)
    else:
      out = report(target, ec, args.model, shape, meshes[0], args.rows_per_device,
                   args.rollout_batch or 0, args.skip_rollout)
    print(json.dumps(out), flush=True)
    outs.append(out)
  return outs


def table(folder: str) -> str:
  """The markdown table of docs/PERFORMANCE.md from the --fit JSON lines saved in `folder`
  (one <name>_b<b_max>.json per run): python -m benchmarks.fit results/tpu_aot"""
  rows = []
  for name in sorted(os.listdir(folder)):
    if name.endswith(".json") and os.path.getsize(os.path.join(folder, name)):
      with open(os.path.join(folder, name)) as f:
        rows.append(dict(json.loads(f.read()), code=_commit(os.path.join(folder, name))))
  order = list(tpu_aot.TOPOLOGIES)
  rows.sort(key=lambda r: (r["b_max"], order.index(r["target"][4:])
                           if r["target"][4:] in order else len(order)))
  out = ["| topology | devices (hosts) | b_max | HBM per device | fits | flags | update | "
         "rollout, per call (prefill / thinking / summaries) | + resident state | code |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ph = r.get("rollout_phases_gb") or {}
    roll = ("-" if r["rollout_gb"] is None else f"{r['rollout_gb']:.2f} "
            f"({' / '.join(f'{v:.2f}' for v in ph.values())}), {r['rollout_calls']} call(s)")
    upd = "-" if r["update_gb"] is None else f"{r['update_gb']:.2f}"
    out.append(f"| {r['target'][4:]} | {r['devices']} ({r['processes']}) | {r['b_max']} | "
               f"{r['hbm_gb']:.2f} | {'yes' if r['fits'] else 'no'} | "
               f"`{' '.join(r['flags'])}` | {upd} | {roll} | {r['resident_gb']:.2f} | "
               f"{r['code']} |")
  return "\n".join(out)


def _commit(json_path: str) -> str:
  """The commit a saved --fit ran on: the first line of the `.state` file beside its JSON line
  ("HEAD <sha> ..."), shortened, with "+" when the work tree then differed from it; "-" if none."""
  state = json_path[:-len(".json")] + ".state"
  if not os.path.exists(state):
    return "-"
  with open(state) as f:
    lines = f.read().splitlines()
  head = lines[0].split()[1][:7] if lines and lines[0].startswith("HEAD ") else "-"
  dirty = any(line.startswith("diff ") and not line.endswith("da39a3ee5e6b") for line in lines)
  return head + ("+" if dirty else "")


PAPER_FLAGFILE = "experiments/configs/deepseek_r1_1.5b_math.flags"


def flagfile(r: dict) -> str:
  """experiments/configs/tpu/<slice>.flags: the paper flagfile and the flags --fit found (its
  JSON line `r`, b_max 8000)."""
  name = r["target"][4:]
  return (f"# The paper recipe ({os.path.basename(PAPER_FLAGFILE)}) on a TPU {name}: "
          f"{r['devices']} devices on {r['processes']} host(s), with the settings that\n"
          f"#   python -m benchmarks.memory --target=tpu:{name} --b_max={r['b_max']} --fit\n"
          f"# found (results/tpu_aot/{name}_b{r['b_max']}.json): XLA:TPU compiles the update "
          f"({r['update_gb']:.2f} GB per device)\n# and one sampler call ({r['rollout_gb']:.2f} "
          f"GB per device, beside {r['resident_gb']:.2f} GB of resident training state) within "
          f"its\n# {r['hbm_gb']:.2f} GB per device. Compile-time memory, not a measurement on a "
          "TPU. Run from the repository root\n# on every host:\n"
          f"#   python experiments/gsm_math.py --flagfile=experiments/configs/tpu/{name}.flags\n"
          f"--flagfile={PAPER_FLAGFILE}\n" + "".join(f + "\n" for f in r["flags"]))


def main_table(argv) -> None:
  """python -m benchmarks.fit RESULTS [--flagfiles=DIR]: the table; with --flagfiles, also write
  DIR/<slice>.flags for every b_max 8000 result that fits."""
  if not argv or len(argv) > 2 or (len(argv) == 2 and not argv[1].startswith("--flagfiles=")):
    sys.exit("usage: python -m benchmarks.fit RESULTS_FOLDER [--flagfiles=DIR] (the table of its "
             "--fit JSON lines); the search itself: python -m benchmarks.memory "
             "--target=tpu:<name> --fit")
  print(table(argv[0]))
  if len(argv) == 2:
    out = argv[1].split("=", 1)[1]
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(argv[0])):
      if not name.endswith("_b8000.json") or not os.path.getsize(os.path.join(argv[0], name)):
        continue
      with open(os.path.join(argv[0], name)) as f:
        r = json.loads(f.read())
      if r["fits"] and r["target"].startswith("tpu:"):
        path = os.path.join(out, f"{r['target'][4:]}.flags")
        with open(path, "w") as f:
          f.write(flagfile(r))
        print(f"wrote {path}")


if __name__ == "__main__":
  main_table(sys.argv[1:])
