"""Question/answer data: loaders for GSM8K JSONL, the paper's JSON lists and the synthetic task.

Also train/eval deduplication and a seeded batch iterator whose position can be saved and restored.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Iterator, Sequence

import numpy as np

from brpo.tasks.arith import task as arith
from brpo.tasks.example import Example

__all__ = ["DataIterator", "Example", "dedup_train_eval", "load_dataset", "load_file",
           "normalize_question"]

log = logging.getLogger("brpo")


# ---------------------------------------------------------------------------------------------
# Files.


def _answer_text(value: Any, where: str) -> tuple[str, tuple[str, ...]]:
  """A JSON answer (number, string or list of them) -> (answer, alternatives)."""
  if isinstance(value, list):
    if not value:
      raise ValueError(f"{where}: field 'answer' is an empty list")
    texts = [_answer_text(v, where)[0] for v in value]
    return texts[0], tuple(texts[1:])
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise ValueError(f"{where}: field 'answer' must be a string, a number or a list of them, "
                     f"got {type(value).__name__}")
  if isinstance(value, float):
    if not math.isfinite(value):
      raise ValueError(f"{where}: field 'answer' is {value}")
    # The AMC set stores integers as floats (142.0); the reference reads as "142".
    return (str(int(value)) if value.is_integer() else repr(value)), ()
  text = str(value).strip()  # Minerva answers carry trailing newlines.
  if not text:
    raise ValueError(f"{where}: field 'answer' is empty")
  return text, ()


def _example(record: Any, where: str, default_id: str) -> Example | None:
  """A parsed JSON record -> Example; None for a record whose answer is null (skipped)."""
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if "question" in record:  # GSM8K
    qkey = "question"
  elif "problem" in record:  # the paper's sets
    qkey = "problem"
  else:
    raise ValueError(f"{where}: missing field 'question' (GSM8K) or 'problem' (paper format)")
  if "answer" not in record:
    raise ValueError(f"{where}: missing field 'answer'")
  question = record[qkey]
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"{where}: field {qkey!r} must be a non-empty string")
  if record["answer"] is None:
    return None  # Two MATH train records have no answer; nothing can grade them.
  answer, alternatives = _answer_text(record["answer"], where)
  if qkey == "question" and not re.search(r"####\s*\S", answer):
    raise ValueError(f"{where}: GSM8K answer does not end with '#### <final answer>'")
  rid = record.get("unique_id", record.get("id", record.get("idx")))
  return Example(question=question, answer=answer, id=str(rid) if rid is not None else default_id,
                 alternatives=alternatives)


BAD_RECORD_POLICIES = ("skip", "error")


class _BadRecords:
  """What a file's records that cannot be used came to: (line, reason) of each, in order."""

  def __init__(self, path: str, policy: str):
    if policy not in BAD_RECORD_POLICIES:
      raise ValueError(f"on_bad_record={policy!r}: must be one of {BAD_RECORD_POLICIES}")
    self.path, self.policy, self.items = path, policy, []

  def example(self, record: Any, line: int, default_id: str) -> Example | None:
    """`_example`, or None for a record skipped (a null answer; any bad record with "skip")."""
    where = f"{self.path}:{line}"
    try:
      ex = _example(record, where, default_id)
    except ValueError as e:
      if self.policy == "error":
        raise
      self.items.append((line, str(e)[len(where) + 2:]))
      return None
    if ex is None:
      self.items.append((line, "field 'answer' is null"))
    return ex

  def warn(self) -> None:
    if self.items:
      lines = ", ".join(f"{n} ({why})" for n, why in self.items[:5])
      more = f" and {len(self.items) - 5} more" if len(self.items) > 5 else ""
      log.warning("%s: skipped %d record(s) that cannot be graded or read: line %s%s",
                  self.path, len(self.items), lines, more)


def _read_jsonl(path: str, text: str, bad: _BadRecords) -> list[Example]:
  out = []
  stem = os.path.basename(path)
  for n, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      msg = f"malformed JSON ({e.msg} at column {e.colno})"
      if bad.policy == "error":
        raise ValueError(f"{path}:{n}: {msg}") from None
      bad.items.append((n, msg))
      continue
    ex = bad.example(record, n, f"{stem}:{n}")
    if ex is not None:
      out.append(ex)
  return out


def _line_of(text: str, pos: int) -> int:
  return text.count("\n", 0, pos) + 1


def _read_json_list(path: str, text: str, bad: _BadRecords) -> list[Example]:
  """A JSON list of records, parsed element by element so that errors can name the line. A
  syntax error is always an error: the records after it cannot be found."""
  decoder = json.JSONDecoder()
  ws = re.compile(r"\s*")
  stem = os.path.basename(path)
  try:
    pos = ws.match(text, 0).end()
    if text[pos:pos + 1] != "[":
      raise json.JSONDecodeError("expected '['", text, pos)
    pos = ws.match(text, pos + 1).end()
    out, index = [], 0
    if text[pos:pos + 1] == "]":
      pos += 1
    else:
      while True:
        record, end = decoder.raw_decode(text, pos)
        ex = bad.example(record, _line_of(text, pos), f"{stem}#{index}")
        if ex is not None:
          out.append(ex)
        index += 1
        pos = ws.match(text, end).end()
        if text[pos:pos + 1] == ",":
          pos = ws.match(text, pos + 1).end()
        elif text[pos:pos + 1] == "]":
          pos += 1
          break
        else:
          raise json.JSONDecodeError("expected ',' or ']'", text, pos)
    pos = ws.match(text, pos).end()
    if pos != len(text):
      raise json.JSONDecodeError("extra data after the list", text, pos)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
  return out


def load_file(path: str, on_bad_record: str = "skip") -> list[Example]:
  """Reads a data file: JSON lines (GSM8K or paper records) or a JSON list (the paper's sets).

  The format comes from the content (a file starting with '[' is a list), so a `.json` file of
  JSON lines also works. Records whose answer is null are skipped (MATH train has two). Other
  bad records (an empty answer, a missing field, a malformed JSON line, ...): with
  on_bad_record="skip" they are skipped and one warning names the file, their count and lines;
  with "error" the first one raises. Raises ValueError, one line naming the file and line, on a
  file that cannot be read at all (missing, not UTF-8, broken JSON list, no usable record).
  """
  bad = _BadRecords(path, on_bad_record)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: data file does not exist")
  with open(path, encoding="utf-8") as f:
    try:
      text = f.read()
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  if text.lstrip().startswith("["):
    examples = _read_json_list(path, text, bad)
  else:
    examples = _read_jsonl(path, text, bad)
  if not examples:
    if not bad.items:
      raise ValueError(f"{path}:1: empty data set (no records)")
    line, why = bad.items[0]
    raise ValueError(f"{path}:{line}: empty data set (all {len(bad.items)} records skipped; "
                     f"the first: {why})")
  bad.warn()
  return examples


def load_dataset(spec: str, on_bad_record: str = "skip") -> list[Example]:
  """A data set by spec: a file path (see `load_file`) or the synthetic task "arith:<split>...".

  Examples: "/data/gsm8k/test.jsonl", "anytime_eval/aime.json", "arith:train",
  "arith:test:n=200,terms=3-6,digits=2" (arith:<split>[:key=value,...], see
  `brpo.tasks.arith.task.parse_spec` for the keys).
  """
  if spec.startswith("arith:"):
    return arith.load(spec)
  if ":" in spec.split(os.sep)[0] and not os.path.exists(spec):
    name = spec.split(":")[0]
    raise ValueError(f"unknown data set {name!r} in {spec!r}: expected a file path or "
                     "arith:<split>")
  return load_file(spec, on_bad_record)


# ---------------------------------------------------------------------------------------------
# Deduplication.


def normalize_question(text: str) -> str:
  """Case- and whitespace-insensitive key for duplicate detection."""
  return " ".join(text.lower().split())


def dedup_train_eval(train: Sequence[Example],
                     evals: Sequence[Example]) -> tuple[list[Example], int]:
  """Drops from `train` every question whose normalised text is in `evals`.

  Returns (kept training examples in their order, number dropped).
  """
  seen = {normalize_question(e.question) for e in evals}
  kept = [e for e in train if normalize_question(e.question) not in seen]
  return kept, len(train) - len(kept)


# ---------------------------------------------------------------------------------------------
# Iteration.


class DataIterator:
  """Endless batches of examples (or any items) in a fresh seeded permutation every epoch.

  The position is (epoch, index into that epoch's permutation); `state()` returns it as a small
  dict and `restore(state)` continues exactly where the saved iterator was. A batch that runs past
  the end of an epoch is completed from the next epoch's permutation, so every batch is full.
  """

  def __init__(self, examples: Sequence[Any], batch_size: int, seed: int):
    if not examples:
      raise ValueError("DataIterator: empty data set")
    if batch_size < 1:
      raise ValueError(f"DataIterator: batch_size={batch_size} must be >= 1")
    self.examples = list(examples)
    self.batch_size = batch_size
    self.seed = seed
    self.epoch = 0
    self.index = 0
    self._perm = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

  def state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
            "size": len(self.examples)}

  def restore(self, state: dict[str, int]) -> None:
    if state["seed"] != self.seed or state["size"] != len(self.examples):
      raise ValueError(f"DataIterator.restore: saved state is for seed={state['seed']}, "
                       f"{state['size']} examples; this iterator has seed={self.seed}, "
                       f"{len(self.examples)} examples")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._perm = self._permutation(self.epoch)

  def __iter__(self) -> Iterator[list[Any]]:
    return self

  def __next__(self) -> list[Any]:
    batch = []
    while len(batch) < self.batch_size:
      take = min(self.batch_size - len(batch), len(self.examples) - self.index)
      batch.extend(self.examples[i] for i in self._perm[self.index:self.index + take])
      self.index += take
      if self.index == len(self.examples):
        self.epoch, self.index = self.epoch + 1, 0
        self._perm = self._permutation(self.epoch)
    return batch
