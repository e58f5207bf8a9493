"""Downloads a model from the Hugging Face hub as a folder `--model=<folder> --init=checkpoint`
reads: the safetensors weights, config.json and the tokenizer files, nothing else.

  pip install -e '.[hub]'                   # the `huggingface_hub` package
  python experiments/download_model.py      # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
  python experiments/download_model.py --repo_id=Qwen/Qwen2.5-1.5B --out_dir=/big/disk/qwen

Without network or without huggingface_hub: one line on stderr and exit status 1.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Callable, Sequence

DEFAULT_REPO = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"

# What models/checkpoint.py and models/tokenizer.py read (weights, config, tokenizer); no
# PyTorch .bin, no README or images.
ALLOW_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def default_out_dir(repo_id: str) -> str:
  return os.path.join("workdir", "hf", repo_id.rstrip("/").split("/")[-1])


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def download(repo_id: str, out_dir: str, snapshot_download: Callable | None = None,
             revision: str | None = None) -> str:
  """Downloads into out_dir and returns it; raises RuntimeError with a one-line message."""
  if snapshot_download is None:
    try:
      from huggingface_hub import snapshot_download
    except ImportError:
      raise RuntimeError("the `huggingface_hub` package is not installed "
                         "(pip install -e '.[hub]')") from None
  try:
    path = snapshot_download(repo_id=repo_id, revision=revision, local_dir=out_dir,
                             allow_patterns=list(ALLOW_PATTERNS))
  except Exception as e:  # No network, unknown repository, gated model...
    raise RuntimeError(f"could not download {repo_id} from the Hugging Face hub "
                       f"({_first_line(e)}); on a machine with network run this command (or "
                       f"`hf download {repo_id} --local-dir <folder>`) and copy the folder to "
                       f"{out_dir}") from None
  path = str(path or out_dir)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise RuntimeError(f"{repo_id}: no config.json in {path} after the download")
  if not glob.glob(os.path.join(path, "*.safetensors")):
    raise RuntimeError(f"{repo_id}: no *.safetensors in {path} after the download (a model "
                       "with PyTorch .bin weights only is not supported)")
  return path


def main(argv: Sequence[str]) -> None:
  from absl import flags

  f = flags.FLAGS
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  out_dir = f.out_dir or default_out_dir(f.repo_id)
  try:
    path = download(f.repo_id, out_dir, revision=f.revision or None)
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  files = sorted(n for n in os.listdir(path) if not n.startswith("."))
  print(f"{f.repo_id} -> {path} ({len(files)} files: {', '.join(files)})")
  print(f"use it with: --model={path} --init=checkpoint")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("repo_id", DEFAULT_REPO, "Hugging Face model repository.")
  flags.DEFINE_string("out_dir", "", "Target folder (default: workdir/hf/<model name>).")
  flags.DEFINE_string("revision", "", "Branch, tag or commit (default: main).")
  app.run(main)
