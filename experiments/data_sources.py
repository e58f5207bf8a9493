"""The sets experiments/prepare_data.py fetches (`SOURCES`: repository, licence, output files) and
how each record becomes ours: GSM8K lines kept as they are, the paper's {"problem", "answer"}
lists read from each source's own field names (answers from a solution's last \\boxed{} where the
source has no answer field)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence


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
