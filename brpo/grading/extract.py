"""Answer extraction (SPEC §4), the format gate and reference answers.

- The response is the text from the inserted "**Final Answer**" marker on (SPEC §4): it is split on
  blank lines, the first paragraph starting with the marker is the answer paragraph, and its last
  `\\boxed{...}` (also `\\boxed {...}` and `\\fbox{...}`, which denote the same box) is the answer.
  If that last box never closes (a summary cut at S tokens) there is no answer: an earlier box in
  the same paragraph is not taken instead, since the model was changing its mind. No fallback to
  "the last number in the text", no answer outside the paragraph.
- The format gate: exactly one `</think>` in thinking + inserted text + summary, and the thinking
  did not end with end-of-sequence.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from brpo.core import texts

# The SPEC §4 texts, written once in brpo.core.texts.
FINAL_ANSWER_MARKER = texts.FINAL_ANSWER
SUMMARY_PREFIX = texts.ANSWER_MARKER
THINK_END = texts.THINK_END

# No reference in the data is longer than ~200 characters; a longer boxed answer is treated as
# missing, which bounds the work any one answer can cost (regexes, IPC, the symbolic parser).
MAX_ANSWER_CHARS = 1000

_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_OPEN_REVERSED = re.compile(r"\{\s*(?:dexob|xobf)\\")
# A backslash escapes the next character, so "\{", "\}" and "\\" never count as braces.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


def _balanced_content(text: str, start: int, max_chars: int) -> str | None:
  """The text from `start` up to the brace that closes an already open "{", or None."""
  depth = 1
  limit = min(len(text), start + max_chars + 1)
  for token in _BRACE_TOKEN.finditer(text, start, limit):
    brace = token.group()
    if brace == "{":
      depth += 1
    elif brace == "}":
      depth -= 1
      if depth == 0:
        return text[start:token.start()]
  return None


def _at_paragraph_start(text: str, pos: int) -> bool:
  """Whether only whitespace holding a blank line, or only whitespace from the start, precedes pos.

  Equivalent to "after splitting on blank lines, the paragraph lstripped starts at pos", but
  reads back only over the whitespace before pos (C-speed windows), never the whole text.
  """
  newlines = 0
  end = pos
  while end > 0:
    start = max(0, end - 256)
    window = text[start:end]
    kept = window.rstrip()
    newlines += window.count("\n", len(kept))
    if newlines >= 2:  # Two newlines with only whitespace between: a blank line.
      return True
    if kept:
      return False
    end = start
  return True


def _last_box_content(paragraph: str, max_chars: int) -> str | None:
  """The content of the paragraph's last box, None if that box never closes or is too long."""
  # The first match in the reversed text is the last opening; one C-level scan either way.
  opening = _BOX_OPEN_REVERSED.search(paragraph[::-1])
  if opening is None:
    return None
  return _balanced_content(paragraph, len(paragraph) - opening.start(), max_chars)


def extract_answer(response: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
  """Returns the boxed final answer of a response (SPEC §4), or None.

  Args:
    response: the text from the inserted marker on ("\\n\\n**Final Answer**\\n" + the summary).
    max_chars: a boxed answer longer than this counts as missing.

  Returns:
    The content of the last `\\boxed{...}` (or `\\boxed {...}`, `\\fbox{...}`) in the first
    paragraph (blank-line separated) that starts with "**Final Answer**" (a newline after the
    marker is not required), stripped; None when there is no such paragraph, no box in it, the
    last box does not close, or its content is empty or too long. Linear in the length of the
    response.
  """
  if not isinstance(response, str):
    return None
  start = response.find(FINAL_ANSWER_MARKER)
  while start >= 0 and not _at_paragraph_start(response, start):
    start = response.find(FINAL_ANSWER_MARKER, start + 1)
  if start < 0:
    return None
  blank = _BLANK_LINE.search(response, start)
  paragraph = response[start:blank.start() if blank else len(response)]
  content = _last_box_content(paragraph, max_chars)
  if content is None:
    return None
  content = content.strip()
  return content or None


def format_ok(full_text: str) -> bool:
  """The format gate of SPEC §4: exactly one `</think>` in thinking + inserted text + summary."""
  return isinstance(full_text, str) and full_text.count(THINK_END) == 1


def gate(thinking_text: str, response: str, thinking_ended_with_eos: bool) -> bool:
  """Whether a summary may score at all: the thinking closed with `</think>`, one tag in all."""
  if thinking_ended_with_eos or not isinstance(thinking_text, str):
    return False
  if not isinstance(response, str):
    return False
  # Counting on the concatenation also catches a tag split across the two parts.
  return format_ok(thinking_text + response)



def reference_answers(reference: Any) -> tuple[str, ...]:
  """Every accepted answer of a reference, as LaTeX strings (a list reference: any is correct).

  Args:
    reference: a GSM8K solution ("... #### 72"), an int or float (AMC's 142.0), a LaTeX string
      (with or without surrounding "$" or a \\boxed{}), or a list/tuple of those.

  Returns:
    A non-empty tuple of distinct, non-empty answer strings, in the given order.

  Raises:
    ValueError: for None, booleans, non-finite floats, empty strings or lists, other types. These
      are data errors and are reported where they enter instead of silently scoring 0.
  """
  if isinstance(reference, (list, tuple)):
    answers = []
    for item in reference:
      for answer in reference_answers(item):
        if answer not in answers:
          answers.append(answer)
    if not answers:
      raise ValueError(f"empty reference list: {reference!r}")
    return tuple(answers)
  return (_one_reference(reference),)


def reference_answer(reference: Any) -> str:
  """The answer string of a reference; for a list, its first answer (see `reference_answers`)."""
  return reference_answers(reference)[0]


def _one_reference(reference: Any) -> str:
  """The answer string of one (non-list) reference; see `reference_answers`."""
  if isinstance(reference, bool) or reference is None:
    raise ValueError(f"reference must be a number or a string, got {reference!r}")
  if isinstance(reference, (int, np.integer)):
    return str(int(reference))
  if isinstance(reference, (float, np.floating)):
    if not math.isfinite(reference):
      raise ValueError(f"reference is not a finite number: {reference!r}")
    reference = float(reference)
    return str(int(reference)) if reference.is_integer() else repr(reference)
  if not isinstance(reference, str):
    raise ValueError(f"reference must be a number or a string, got {type(reference).__name__}")
  text = reference
  if "####" in text:  # A GSM8K solution: the answer follows the last "####".
    text = text.rsplit("####", 1)[1]
  text = text.strip()
  for _ in range(2):  # "$...$", "$$...$$", "\boxed{...}", in either nesting.
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
      text = text.strip("$").strip()
    match = _BOX_OPEN.match(text)
    if match:
      inner = _balanced_content(text, match.end(), len(text))
      if inner is not None and len(inner) == len(text) - match.end() - 1:
        text = inner.strip()
  if not text:
    raise ValueError(f"empty reference answer in {reference!r}")
  return text

