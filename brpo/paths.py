"""Workdir paths through `etils.epath` (as orbax does), so that a `gs://...` (or `s3://...`)
workdir is written to its object store instead of becoming a local folder named "gs:".

Local paths keep their old behaviour (absolute paths, atomic renames); a remote path is never
made absolute, and a file there is written as one object (atomic per object on object stores).
Libraries that read or write local files only (sentencepiece, tokenizers, tensorboardX) go
through `local_copy` and `copy_files`. A leaf module: `run` and `tasks` both use it.
"""

from __future__ import annotations

import os
import tempfile

from etils import epath


def is_remote(path: epath.PathLike) -> bool:
  """Whether `path` is a URI (gs://, s3://, ...) rather than a local path."""
  return "://" in os.fspath(path)


def resolve(path: epath.PathLike) -> str:
  """The absolute path of a local `path`; a remote one as it is."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def write_text(path: epath.PathLike, text: str) -> None:
  """Writes `text` so that readers never see half of it: a temporary file renamed into place
  locally, a single object write on an object store."""
  path = epath.Path(path)
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def local_copy(path: epath.PathLike) -> str:
  """`path` when local; a remote file copied to a local temporary file (for readers of local
  files only), whose path is returned."""
  if not is_remote(path):
    return os.fspath(path)
  local = os.path.join(tempfile.mkdtemp(prefix="brpo_"), epath.Path(path).name)
  with open(local, "wb") as f:
    f.write(epath.Path(path).read_bytes())
  return local


def copy_files(local_dir: str, dest: epath.PathLike) -> None:
  """Copies the files of a local folder into `dest` (a local folder or gs://...), made if
  missing."""
  dest = epath.Path(dest)
  dest.mkdir(parents=True, exist_ok=True)
  for name in os.listdir(local_dir):
    with open(os.path.join(local_dir, name), "rb") as f:
      (dest / name).write_bytes(f.read())
