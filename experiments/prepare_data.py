"""Fetches the training and evaluation sets from the Hugging Face hub and writes them in the
formats `brpo.tasks.data` reads (GSM8K JSON lines, the paper's JSON lists), with a MANIFEST.json.

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

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1


class FetchError(Exception):
  """A source could not be read (no network, no `datasets` package, unknown repository...)."""


# A loader: (repo_id or local folder, config or None, split) -> iterable of records (dicts).
# The default goes through `datasets.load_dataset`; tests inject their own.
Loader = Callable[[str, "str | None", str], Iterable[Mapping[str, Any]]]


# ---------------------------------------------------------------------------------------------
# Record conversion.


def _clean_answer(value: Any) -> Any:
  """A source answer -> a JSON answer brpo.tasks.data reads (string, number or list of them), or None
  when there is none (null, blank, empty list, NaN, a value of another type)."""
  if value is None or isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, str):
    return value if value.strip() else None
  if isinstance(value, (list, tuple)):
    items = [a for a in (_clean_answer(v) for v in value) if a is not None and
             not isinstance(a, list)]
    return items or None
  return None


_BOX = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: Any) -> str | None:
  """The content of the last \\boxed{...} (or \\fbox{...}, or \\boxed X) in a solution, or None."""
  if not isinstance(text, str):
    return None
  matches = list(_BOX.finditer(text))
  for m in reversed(matches):
    pos = m.end()
    if text[pos:pos + 1] == "{":
      depth, i = 0, pos
      while i < len(text):
        c = text[i]
        if c == "\\":
          i += 2
          continue
        if c == "{":
          depth += 1
        elif c == "}":
          depth -= 1
          if depth == 0:
            content = text[pos + 1:i].strip()
            return content or None
        i += 1
      continue  # Unbalanced: try an earlier box.
    if m.group(0)[-1].isspace():  # "\boxed 5$": the token after the space.
      tail = re.match(r"[^\s$]+", text[pos:])
      if tail:
        return tail.group(0)
  return None


def _first(record: Mapping[str, Any], keys: Sequence[str]) -> Any:
  for k in keys:
    if record.get(k) is not None:
      return record[k]
  return None


def _jsonable(value: Any) -> bool:
  if value is None or isinstance(value, (str, bool, int)):
    return True
  if isinstance(value, float):
    return math.isfinite(value)
  if isinstance(value, (list, tuple)):
    return all(_jsonable(v) for v in value)
  return False


def convert_gsm8k(record: Mapping[str, Any]) -> dict | None:
  """GSM8K row -> {"question", "answer"} (the solution ending "#### N"), or None to skip."""
  question, answer = record.get("question"), record.get("answer")
  if not isinstance(question, str) or not question.strip():
    return None
  if not isinstance(answer, str) or not re.search(r"####\s*\S", answer):
    return None
  return {"question": question, "answer": answer}


def paper_converter(problem_keys: Sequence[str] = ("problem",),
                    answer_keys: Sequence[str] = ("answer",),
                    extra: Sequence[tuple[str, str]] = (),
                    boxed_from: str | None = None,
                    join_list: bool = False) -> Callable[[Mapping[str, Any]], dict | None]:
  """A converter to the paper's record {"problem", "answer", extras...}.

  problem_keys/answer_keys: source fields tried in order. extra: (output key, source key) pairs
  copied when present (and plain JSON). boxed_from: a solution field whose last \\boxed{} is the
  answer when no answer field has one. join_list: a list answer holds parts that are all required
  (OlympiadBench), joined with ", " into one reference, not alternatives.
  """

  def convert(record: Mapping[str, Any]) -> dict | None:
    problem = _first(record, problem_keys)
    if not isinstance(problem, str) or not problem.strip():
      return None
    answer = _clean_answer(_first(record, answer_keys))
    if answer is None and boxed_from is not None:
      answer = _clean_answer(last_boxed(record.get(boxed_from)))
    if answer is None:
      return None
    if join_list and isinstance(answer, list) and len(answer) > 1:
      answer = [", ".join(str(a) for a in answer)]
    out = {"problem": problem, "answer": answer}
    for key, source_key in extra:
      if source_key in record and _jsonable(record[source_key]):
        value = record[source_key]
        out[key] = list(value) if isinstance(value, tuple) else value
    return out

  return convert


# ---------------------------------------------------------------------------------------------
# The data sets.


@dataclasses.dataclass(frozen=True)
class OutFile:
  path: str  # relative to data_dir, "/"-separated
  parts: tuple[tuple[str | None, str], ...]  # (config, split) read in this order
  fmt: str  # "jsonl" (GSM8K) or "json" (the paper's list)


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  repo_id: str
  licence: str  # as the source states it
  files: tuple[OutFile, ...]
  convert: Callable[[Mapping[str, Any]], dict | None]
  record_format: str  # one line for the instructions

  @property
  def url(self) -> str:
    return f"https://huggingface.co/datasets/{self.repo_id}"


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")
_PAPER = 'JSON list of {"problem", "answer", ...}'

SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("gsm8k", "openai/gsm8k", "MIT",
           (OutFile("gsm8k/train.jsonl", (("main", "train"),), "jsonl"),
            OutFile("gsm8k/test.jsonl", (("main", "test"),), "jsonl")),
           convert_gsm8k, 'JSON lines {"question", "answer" ending "#### N"}'),
    Source("deepscaler", "agentica-org/DeepScaleR-Preview-Dataset", "MIT",
           (OutFile("deepscaler/train.json", ((None, "train"),), "json"),),
           paper_converter(), _PAPER),
    Source("math_train", "EleutherAI/hendrycks_math", "MIT",
           (OutFile("math_train/math.json", tuple((s, "train") for s in MATH_SUBJECTS), "json"),),
           paper_converter(boxed_from="solution", extra=(("level", "level"), ("type", "type"))),
           _PAPER + " (answer: the last \\boxed{} of the solution)"),
    Source("aime", "HuggingFaceH4/aime_2024", "none stated on the dataset card",
           (OutFile("anytime_eval/aime.json", ((None, "train"),), "json"),),
           paper_converter(("problem", "Problem"), ("answer", "Answer"),
                           extra=(("solution", "solution"), ("url", "url"), ("year", "year"),
                                  ("id", "id")), boxed_from="solution"), _PAPER),
    Source("amc", "AI-MO/aimo-validation-amc", "none stated on the dataset card",
           (OutFile("anytime_eval/amc.json", ((None, "train"),), "json"),),
           paper_converter(extra=(("url", "url"), ("id", "id"))), _PAPER),
    Source("math500", "HuggingFaceH4/MATH-500", "none stated on the dataset card (from MATH, MIT)",
           (OutFile("anytime_eval/math.json", ((None, "test"),), "json"),),
           paper_converter(extra=(("solution", "solution"), ("subject", "subject"),
                                  ("level", "level"), ("unique_id", "unique_id")),
                           boxed_from="solution"), _PAPER),
    Source("minerva", "math-ai/minervamath", "none stated on the dataset card",
           (OutFile("anytime_eval/minerva.json", ((None, "test"),), "json"),),
           paper_converter(("problem", "question"), ("answer", "final_answer"),
                           extra=(("solution", "solution"), ("type", "type"), ("idx", "idx")),
                           boxed_from="solution"), _PAPER),
    Source("olympiad_bench", "Hothan/OlympiadBench", "Apache-2.0",
           (OutFile("anytime_eval/olympiad_bench.json", (("OE_TO_maths_en_COMP", "train"),),
                    "json"),),
           paper_converter(("question", "problem"), ("final_answer", "answer"),
                           extra=(("id", "id"), ("subfield", "subfield"), ("context", "context"),
                                  ("solution", "solution"),
                                  ("is_multiple_answer", "is_multiple_answer"), ("unit", "unit"),
                                  ("answer_type", "answer_type"), ("error", "error")),
                           join_list=True), _PAPER),
)}


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
