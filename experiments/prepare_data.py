"""Fetches the training and evaluation sets from the Hugging Face hub and writes them in the
formats `brpo.tasks.data` reads (GSM8K JSON lines, the paper's JSON lists), with a MANIFEST.json.
The sets and their record conversions are in experiments/data_sources.py.

  pip install -e '.[data]'                  # the `datasets` package
  python experiments/prepare_data.py        # all sets into data/
  python experiments/prepare_data.py --datasets=gsm8k,aime --data_dir=/big/disk/data

Layout under --data_dir (the flagfiles' `--train_data`/`--eval_data` then name these files):

  gsm8k/train.jsonl, gsm8k/test.jsonl          openai/gsm8k (config main)
  deepscaler/train.json                        agentica-org/DeepScaleR-Preview-Dataset
  math_train/math.json                         EleutherAI/hendrycks_math (7 subjects, train)
  anytime_eval/aime.json                       HuggingFaceH4/aime_2024
  anytime_eval/amc.json                        AI-MO/aimo-validation-amc
  anytime_eval/math.json                       HuggingFaceH4/MATH-500 (test)
  anytime_eval/minerva.json                    math-ai/minervamath (test)
  anytime_eval/olympiad_bench.json             Hothan/OlympiadBench (config OE_TO_maths_en_COMP)
  MANIFEST.json                                per file: source, records, skipped, sha256

The output is deterministic: the same source rows give the same bytes (records in source order,
fixed key order, ASCII JSON, no timestamps). Records whose problem or answer is missing or empty
(or, for GSM8K, whose answer lacks "#### N") are skipped and counted per file. A set whose files
are already there and match MANIFEST.json is not fetched again (--overwrite refetches it); a file
that is there but differs from the manifest is an error, never silently replaced.

Without network, or without `datasets`, it prints for every set that could not be fetched what to
fetch and where to put it (a hub snapshot under <data_dir>/hub/<owner>/<name>/, which this command
then reads instead of the network), and exits 1 with a one-line error on its last line.
See docs/DATA.md for sources and licences.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

from experiments.data_sources import SOURCES, OutFile, Source

MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1


class FetchError(Exception):
  """A source could not be read (no network, no `datasets` package, unknown repository...)."""


# A loader: (repo_id or local folder, config or None, split) -> iterable of records (dicts).
# The default goes through `datasets.load_dataset`; tests inject their own.
Loader = Callable[[str, "str | None", str], Iterable[Mapping[str, Any]]]


# ---------------------------------------------------------------------------------------------
# Writing.


def render(records: Sequence[dict], fmt: str) -> bytes:
  """The exact bytes of a data file (ASCII JSON, fixed layout, trailing newline)."""
  if fmt == "jsonl":
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
  elif fmt == "json":
    text = json.dumps(list(records), indent=2, allow_nan=False) + "\n"
  else:
    raise ValueError(f"unknown format {fmt!r}")
  return text.encode("ascii")


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def read_manifest(data_dir: str) -> dict:
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.isfile(path):
    return {"version": MANIFEST_VERSION, "files": {}}
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
    if not isinstance(manifest.get("files"), dict):
      raise ValueError("no 'files' object")
  except (ValueError, AttributeError) as e:
    raise ValueError(f"{path}: not a manifest of this command ({e})") from None
  return manifest


def _render_manifest(manifest: dict) -> bytes:
  manifest = {"version": MANIFEST_VERSION,
              "generator": "experiments/prepare_data.py",
              "files": {k: manifest["files"][k] for k in sorted(manifest["files"])}}
  return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("ascii")


def _local_path(path: str) -> str:
  return os.path.join(*path.split("/"))


def up_to_date(data_dir: str, source: Source, manifest: dict) -> bool | str:
  """True: every file of the set is there and matches the manifest; False: none is there;
  otherwise a one-line reason why the files there cannot be kept or replaced silently."""
  present = [f for f in source.files if os.path.exists(os.path.join(data_dir, _local_path(f.path)))]
  if not present:
    return False
  for f in source.files:
    full = os.path.join(data_dir, _local_path(f.path))
    entry = manifest["files"].get(f.path)
    if not os.path.isfile(full):
      return f"{full} is missing while other files of {source.name!r} are there"
    if entry is None:
      return f"{full} is not in {MANIFEST}"
    if sha256_file(full) != entry.get("sha256"):
      return f"{full} differs from its sha256 in {MANIFEST}"
  return True


# ---------------------------------------------------------------------------------------------
# Fetching.


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def hub_loader(hub_dir: str | None) -> Loader:
  """The default loader: `datasets.load_dataset`, from <hub_dir>/<owner>/<name> when that folder
  exists (a snapshot fetched elsewhere), else from the hub."""

  unreachable: list[str] = []  # After one connection failure the hub is not tried again.

  def load(repo_id: str, config: str | None, split: str) -> Iterable[Mapping[str, Any]]:
    try:
      import datasets  # noqa: F401  (optional: pip install -e '.[data]')
    except ImportError:
      raise FetchError("the `datasets` package is not installed "
                       "(pip install -e '.[data]')") from None
    local = os.path.join(hub_dir, *repo_id.split("/")) if hub_dir else None
    path = local if local and os.path.isdir(local) else repo_id
    if path == repo_id and unreachable:
      raise FetchError(f"{repo_id}: not tried, the hub was unreachable ({unreachable[0]})")
    try:
      return datasets.load_dataset(path, config, split=split)
    except Exception as e:  # No network, unknown repository, offline mode...
      if path == repo_id and isinstance(e, (ConnectionError, OSError)):
        unreachable.append(_first_line(e))
      raise FetchError(f"{path}: {_first_line(e)}") from None

  return load


def convert_file(out: OutFile, source: Source, load: Loader) -> tuple[list[dict], int]:
  records, skipped = [], 0
  for config, split in out.parts:
    for row in load(source.repo_id, config, split):
      rec = source.convert(row)
      if rec is None:
        skipped += 1
      else:
        records.append(rec)
  return records, skipped


def instructions(source: Source, data_dir: str, hub_dir: str) -> str:
  parts = sorted({(c, s) for f in source.files for c, s in f.parts},
                 key=lambda p: (p[0] or "", p[1]))
  configs = sorted({c for c, _ in parts if c})
  splits = sorted({s for _, s in parts})
  where = "config " + ", ".join(configs) + "; " if configs else ""
  snapshot = os.path.join(hub_dir, *source.repo_id.split("/"))
  outs = ", ".join(os.path.join(data_dir, _local_path(f.path)) for f in source.files)
  return (f"  fetch: {source.url} ({where}split {', '.join(splits)}), e.g. with\n"
          f"         hf download {source.repo_id} --repo-type dataset --local-dir {snapshot}\n"
          f"  put:   that snapshot at {snapshot}/ (copy it there if fetched on another machine),\n"
          f"         then run this command again (with `datasets`: pip install -e '.[data]');\n"
          f"         it writes {outs} ({source.record_format})\n")


def prepare(data_dir: str, names: Sequence[str], overwrite: bool = False,
            load: Loader | None = None, hub_dir: str | None = None,
            out: TextIO | None = None, err: TextIO | None = None) -> int:
  """Fetches and writes the named sets; returns the exit status (0 ok, 1 error)."""
  out = out or sys.stdout
  err = err or sys.stderr
  hub_dir = hub_dir if hub_dir is not None else os.path.join(data_dir, "hub")
  load = load or hub_loader(hub_dir)
  try:
    manifest = read_manifest(data_dir)
  except ValueError as e:
    print(f"error: {e}", file=err)
    return 1
  failed: list[tuple[Source, str]] = []
  conflicts: list[str] = []
  for name in names:
    source = SOURCES[name]
    state = up_to_date(data_dir, source, manifest)
    if state is True and not overwrite:
      print(f"{name}: up to date ({', '.join(f.path for f in source.files)})", file=out)
      continue
    if isinstance(state, str) and not overwrite:
      conflicts.append(state)
      print(f"{name}: {state}; pass --overwrite to fetch it again", file=err)
      continue
    try:
      converted = [(f, *convert_file(f, source, load)) for f in source.files]
    except FetchError as e:
      failed.append((source, str(e)))
      continue
    for f, records, skipped in converted:
      if not records:
        failed.append((source, f"{source.repo_id} gave no usable record for {f.path}"))
        break
    else:
      for f, records, skipped in converted:
        data = render(records, f.fmt)
        _write_atomic(os.path.join(data_dir, _local_path(f.path)), data)
        manifest["files"][f.path] = {
            "dataset": name, "source": source.repo_id, "licence": source.licence,
            "parts": [{"config": c, "split": s} for c, s in f.parts], "format": f.fmt,
            "records": len(records), "skipped": skipped,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        print(f"{name}: wrote {f.path}: {len(records)} records, {skipped} skipped "
              "(missing problem or answer)", file=out)
      _write_atomic(os.path.join(data_dir, MANIFEST), _render_manifest(manifest))
  if failed:
    print(f"Could not fetch {len(failed)} data set(s). Either run this command on a machine with "
          f"network and copy {data_dir} here, or for each set:", file=err)
    for source, why in failed:
      print(f"{source.name}: {why}", file=err)
      print(instructions(source, data_dir, hub_dir), end="", file=err)
  if failed or conflicts:
    what = []
    if failed:
      what.append(f"could not fetch {', '.join(s.name for s, _ in failed)} "
                  "(no network or no `datasets` package; what to fetch and where to put it is "
                  "printed above)")
    if conflicts:
      what.append(f"files of {len(conflicts)} set(s) differ from {MANIFEST} (pass --overwrite "
                  "to fetch them again)")
    print("error: " + "; ".join(what), file=err)
    return 1
  return 0


def parse_names(values: Sequence[str]) -> list[str]:
  """--datasets values -> set names in the canonical order; "all" (or nothing) means every set."""
  wanted = {v.strip() for v in values if v.strip()}
  if not wanted or "all" in wanted:
    return list(SOURCES)
  unknown = sorted(wanted - set(SOURCES))
  if unknown:
    raise ValueError(f"unknown data set(s) {', '.join(unknown)}; known: all, "
                     + ", ".join(SOURCES))
  return [n for n in SOURCES if n in wanted]


def main(argv: Sequence[str]) -> None:
  from absl import flags

  f = flags.FLAGS
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  try:
    names = parse_names(f.datasets)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(prepare(f.data_dir, names, overwrite=f.overwrite, hub_dir=f.hub_dir or None))


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("data_dir", "data/", "Where the files and MANIFEST.json are written.")
  flags.DEFINE_list("datasets", ["all"], "Sets to prepare: all, or some of "
                    + ", ".join(SOURCES) + ".")
  flags.DEFINE_bool("overwrite", False, "Fetch and rewrite sets whose files are already there.")
  flags.DEFINE_string("hub_dir", "", "Folder of hub snapshots <owner>/<name>/ read instead of "
                      "the network when present (default: <data_dir>/hub).")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
