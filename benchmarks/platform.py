"""`--platform` for the benchmarks, read from the command line before jax is imported (JAX picks
its backend at import): cpu (the default, so a benchmark never grabs an accelerator by
accident), gpu, tpu, or auto (whatever JAX finds)."""

from __future__ import annotations

import os
import sys
import time

PLATFORMS = ("cpu", "gpu", "tpu", "auto")


def platform_from_argv(argv=None, default: str = "cpu") -> str:
  argv = sys.argv[1:] if argv is None else argv
  for i, a in enumerate(argv):
    if a.startswith("--platform="):
      return a.split("=", 1)[1]
    if a == "--platform" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def set_platform(argv=None, default: str = "cpu") -> str:
  """Sets JAX_PLATFORMS from --platform (unless already set in the environment)."""
  p = platform_from_argv(argv, default)
  if p not in PLATFORMS:
    raise SystemExit(f"--platform={p}: expected one of {', '.join(PLATFORMS)}")
  if p != "auto":
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if p == "gpu" else p)
  return p


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
  """`batch` random token lists of `length` ids, clear of the low (special) ids."""
  import numpy as np

  rng = np.random.default_rng(seed)
  low = min(100, vocab // 4)  # clear of the special ids; small vocabularies (tiny: 128) too
  return [rng.integers(low, vocab - low, size=length).tolist() for _ in range(batch)]


def best_time(fn, repeats: int) -> float:
  """Best wall time in seconds of `repeats` calls of fn() (after one warm-up call that
  compiles); fn must wait for its result (block_until_ready)."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best
