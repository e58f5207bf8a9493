"""XLA:TPU ahead of time from this CPU host (benchmarks.tpu_aot, benchmarks.fit): the tiny
config's update and one sampler call compiled for a small TPU topology, and --fit against a
made-up HBM. libtpu (XLA:TPU's compiler, no TPU needed) comes with requirements-test.txt; where
it cannot be installed, BRPO_SKIP_TPU_AOT=1 skips these tests, otherwise its absence fails them.
"""

import json
import os

import jax
import pytest

from benchmarks import fit
from benchmarks import memory as mem
from benchmarks import tpu_aot
from experiments import gsm_math
from models import sharding as shd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [f"--flagfile={ROOT}/experiments/configs/tiny_cpu.flags", "--init=random"]
# --fit's test run: 32 prompts x 8 = 256 thinkings per rollout, mini-batches of one prompt's 8 rows
# (on 4 devices: 1 or 2 rows per device per micro-batch, two candidates to compile).
FIT_RUN = TINY + ["--prompts_per_batch=32", "--mini_batch_prompts=1"]
TOPOLOGY = "v5e:2x2"  # 4 chips, one device each, one host
SHAPE = fit.Shape(prompt_len=32, b_max=96, n_insert=4)
# A made-up HBM per device: XLA:TPU's figures for FIT_RUN are ~11.7e6 bytes for the update and,
# per sampler call, ~7.8e6 for 128 rows and ~15.6e6 for 256 (the thinking loop's KV cache),
# beside ~0.94e6 of resident training state: all 256 rows in one call do not fit, 128 do.
HBM = 13e6


@pytest.fixture(scope="module")
def devices():
  if os.environ.get("BRPO_SKIP_TPU_AOT"):
    pytest.skip("BRPO_SKIP_TPU_AOT is set")
  try:
    return tpu_aot.devices(TOPOLOGY)
  except tpu_aot.LibtpuMissing as e:
    pytest.fail(f"{e} (set BRPO_SKIP_TPU_AOT=1 to skip the XLA:TPU tests)")


def test_refusal_is_parsed_from_xla_messages():
  r = tpu_aot.refusal("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                      "for HLO temporaries (38.71G) exceeds available HBM (30.75G).")
  assert (r.needs, r.available) == (38.71 * 2 ** 30, 30.75 * 2 ** 30)
  r.what = "prefill"
  assert str(r) == "does not fit: prefill needs 41.56 of 33.02 GB per device"
  assert tpu_aot.refusal("INVALID_ARGUMENT: something else") is None


def test_named_topologies_and_xla_hbm(devices):
  """Every named multi-host topology gives devices of several processes; XLA's own HBM limit is
  read from its refusal (v5e: 16 GiB chips)."""
  v5p64 = tpu_aot.devices("v5p-64")
  assert len(v5p64) == 32 and len({d.process_index for d in v5p64}) == 8
  assert len(tpu_aot.devices("tpu7x-8")) == 8  # two devices per chip
  assert 15e9 < tpu_aot.available_hbm(devices) < 2 ** 34
  with pytest.raises(ValueError, match="unknown TPU topology"):
    tpu_aot.topology("v9-8")


def _compile_with_flags(devices, flags, limit):
  """The tiny run with `flags` (as --fit prints them): its update and one sampler call compiled
  by XLA:TPU under `limit` bytes per device (the rollout's beside the resident training state).
  Returns (update, rollout, resident bytes, the device sets of every compiled program)."""
  ec = gsm_math.config_from_args(FIT_RUN + flags)
  mesh = shd.make_mesh(ec.run.mesh, devices=devices)
  cfg = fit.model_config(ec, "tiny", ec.model.remat)
  target = fit.Target("tpu:" + TOPOLOGY, devices, limit, True)
  seen = []

  def compile_fn(limit_):
    inner = target.compile_fn(limit_)

    def fn(lowered, what):
      compiled = inner(lowered, what)
      seen.append({d for s in jax.tree.leaves(compiled.input_shardings) for d in s.device_set})
      return compiled
    return fn

  rows = ec.rl.mini_batch_prompts * ec.rl.group_size
  t, trunk, c, w = SHAPE.packed(ec.rl)
  ec_s = mem.at_shape(ec, SHAPE.prompt_len, SHAPE.b_max)
  update = mem.update_memory(cfg, ec_s, mesh, rows // (ec.rl.micro_batches * len(devices)), t,
                             trunk, c, w, compile_fn(limit))
  resident = fit.resident_bytes(cfg, ec, mesh)
  n = ec.rl.rollout_batch or ec.rl.prompts_per_batch * ec.rl.group_size
  rl = ec.rl
  rollout = mem.rollout_memory(cfg, mesh, n, SHAPE.prompt_len, SHAPE.b_max, rl.n_budgets,
                               rl.n_summaries, rl.summary_len, SHAPE.n_insert,
                               compile_fn(limit - resident))
  return update, rollout, resident, seen


def test_fit_picks_less_under_a_small_hbm_and_its_flags_compile(devices, capsys):
  """--fit against a made-up HBM picks a smaller rollout chunk (or more micro-batches) than the
  unconstrained all-at-once choice; the flags it prints, parsed as a run's flags, compile by
  XLA:TPU under that limit: the update and one sampler call (prefill, thinking loop, summary
  loop), each on every device of the topology, with positive per-device figures."""
  target = fit.Target("tpu:" + TOPOLOGY, devices, HBM, True)
  ec = gsm_math.config_from_args(FIT_RUN)
  out = fit.fit(target, ec, "tiny", SHAPE, [(1, -1, 1)], ["none"])
  log = capsys.readouterr().out
  assert out["fits"], log
  flags = dict(f[2:].split("=", 1) for f in out["flags"])
  all_rows = ec.rl.prompts_per_batch * ec.rl.group_size
  # Unconstrained, everything fits at once: all rows in one sampler call, one micro-batch.
  assert int(flags["rollout_batch"]) not in (0, all_rows) or int(flags["micro_batches"]) > 1, log
  # The search compiled the unconstrained chunk and XLA:TPU refused it.
  assert f"rollout {all_rows} rows per sampler call: does not fit" in log
  assert json.loads(json.dumps(out)) == out
  # The picked flags compile under the limit (XLA:TPU enforces it), on every device.
  update, rollout, resident, seen = _compile_with_flags(devices, out["flags"], HBM)
  assert 0 < update["peak_gb"] * 1e9 <= HBM
  assert 0 < rollout["peak_gb"] * 1e9 + resident <= HBM
  assert all(v["peak_gb"] > 0 for v in rollout["phases"].values())
  assert resident > 0
  assert len(seen) == 4 and all(s == set(devices) for s in seen)  # update + 3 rollout programs
  assert update["micro_batches"] == int(flags["micro_batches"])


def test_a_refused_compile_is_one_line(devices, capsys):
  """benchmarks.memory --target=tpu:... prints a refusal as one line, no traceback."""
  out, _ = mem.main([f"--flagfile={ROOT}/experiments/configs/tiny_cpu.flags", "--model=tiny",
                     "--prompt_len=32", "--b_max=96", "--n_insert=4", f"--target=tpu:{TOPOLOGY}",
                     "--hbm_gb=0.004", "--skip_rollout"])
  text = capsys.readouterr().out
  assert out[0]["fits"] is False
  assert out[0]["update_gb"].startswith("does not fit: update needs ")
  assert "Traceback" not in text



def test_tpu_flagfiles_are_the_paper_recipe_with_the_fitted_flags():
  """experiments/configs/tpu/<name>.flags: the paper flagfile plus the flags that --fit printed
  for that slice at b_max 8000 (results/tpu_aot/<name>_b8000.json, fits true); they parse."""
  folder = os.path.join(ROOT, "experiments", "configs", "tpu")
  names = sorted(f[:-6] for f in os.listdir(folder) if f.endswith(".flags"))
  assert "v4-8" in names
  for name in names:
    with open(os.path.join(folder, f"{name}.flags")) as f:
      lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "--flagfile=experiments/configs/deepseek_r1_1.5b_math.flags", name
    with open(os.path.join(ROOT, "results", "tpu_aot", f"{name}_b8000.json")) as f:
      found = json.load(f)
    assert found["fits"] and found["target"] == f"tpu:{name}", name
    assert lines[1:] == found["flags"], name
    ec = gsm_math.config_from_args([f"--flagfile={folder}/{name}.flags"], relative_to=ROOT)
    flags = dict(f[2:].split("=", 1) for f in found["flags"])
    assert ec.rl.b_max == 8000 and ec.model.remat == flags["remat"], name
    assert ec.rl.rollout_batch == int(flags["rollout_batch"]), name


def test_fit_table_names_the_code_of_each_result(tmp_path):
  """python -m benchmarks.fit RESULTS: one row per saved --fit line, ordered by b_max and slice,
  each with the commit its `.state` file names ("+": the work tree differed; "-": no file)."""
  line = {"hbm_gb": 33.02, "update_gb": 25.19, "rollout_gb": 12.31, "resident_gb": 5.33,
          "fits": True, "flags": ["--mesh=1,-1,1"], "devices": 4, "processes": 1,
          "rollout_phases_gb": {"prefill": 9.73, "thinking": 11.79, "summaries": 12.31},
          "rollout_calls": 4}
  for name, b, state in (("v5e-8", 8000, "HEAD 2a1cf79a26c5 (git archive of HEAD)\n"),
                         ("v4-8", 16000, "HEAD fb051cc7b3f0\ndiff brpo models sha1 64200c82eace\n"),
                         ("v4-8", 8000, None)):
    (tmp_path / f"{name}_b{b}.json").write_text(json.dumps(dict(line, target=f"tpu:{name}",
                                                                b_max=b)))
    if state:
      (tmp_path / f"{name}_b{b}.state").write_text(state)
  rows = fit.table(str(tmp_path)).splitlines()[2:]
  assert [r.split(" | ")[0] + " " + r.split(" | ")[2] for r in rows] == [
      "| v4-8 8000", "| v5e-8 8000", "| v4-8 16000"]
  assert [r.split(" | ")[-1] for r in rows] == ["- |", "2a1cf79 |", "fb051cc+ |"]
  assert "12.31 (9.73 / 11.79 / 12.31), 4 call(s)" in rows[0]
