"""Test setup: 8 fake CPU devices (for sharding tests) and float32 matmuls everywhere."""
import os

# Appended, not set: run.sh exports XLA_FLAGS (an instruction-set cap) before pytest starts.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The warm start that tests running the tiny task share: 20 steps teach it nothing, but train,
# save and reuse it like the real one in seconds. Pass both flags to reuse it.
WARMSTART_STEPS = 20


@pytest.fixture(scope="session")
def tiny_warmstart_dir(tmp_path_factory) -> str:
  """A directory holding the tiny task's 20-step warm start, built once per test session;
  runs with --warmstart_dir=<it> --warmstart_steps=20 (and the default --warmstart_seed) reuse it.
  """
  from brpo.run import runner
  from experiments import gsm_math

  path = str(tmp_path_factory.mktemp("warmstart_tiny"))
  # Through the runner, so the saved settings are exactly those a run derives from its flags.
  runner.load_model(gsm_math.config_from_args([
      f"--flagfile={ROOT}/experiments/configs/tiny_cpu.flags", f"--warmstart_dir={path}",
      f"--warmstart_steps={WARMSTART_STEPS}", "--progress=false"]))
  return path


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, tiny_warmstart_dir) -> str:
  """The workdir of a 3-step tiny run (tests/run_helpers.py) that nobody stopped, on one process
  with 8 devices: the reference of the resume and multi-process tests."""
  import run_helpers as rh

  workdir = tmp_path_factory.mktemp("uninterrupted")
  rh.finish(rh.start(str(workdir), tiny_warmstart_dir))
  records = rh.read_metrics(str(workdir))
  assert [r["step"] for r in records] == [1, 2, 3]
  # The updates moved the parameters: a resume test of a run that does not train proves little.
  assert all(r["grad_norm"] > 0 for r in records)
  assert rh.checkpoint_steps(str(workdir)) == [1, 2, 3]
  return str(workdir)
