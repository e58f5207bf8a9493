"""Rewards for summaries: extract the final boxed answer, check the format, grade it exactly.

Exact numbers are graded in-process; symbolic answers go to a pool of killable worker processes.

Decisions (the why behind the code):
- The response is the text from the inserted "**Final Answer**" marker on (SPEC §4): it is split on
  blank lines, the first paragraph starting with the marker is the answer paragraph, and its last
  `\\boxed{...}` (also `\\boxed {...}` and `\\fbox{...}`, which denote the same box) is the answer.
  If that last box never closes (a summary cut at S tokens) there is no answer: an earlier box in
  the same paragraph is not taken instead, since the model was changing its mind. No fallback to
  "the last number in the text", no answer outside the paragraph.
- Integer, decimal, simple fraction and scientific-notation answers are compared as exact rationals
  (`fractions.Fraction`): "72" == "72.0" == "7.2 \\times 10^{1}", but 0.333 != 1/3.
- Everything else goes through math-verify (reference as "$ref$", answer as "$\\boxed{ans}$"). It
  rounds to 6 decimals whenever a side holds a float, so decimals are first replaced by the
  rationals they spell: then 0.333333 != 1/3 and 1.414214 != sqrt 2, in tuples and sets too.
- math-verify can hang or blow up memory on hostile LaTeX (power towers, 100000!, deep brackets):
  its signal-based timeouts cannot stop a long C-level computation. So symbolic grading runs in
  worker processes that each hold a soft SIGALRM deadline; the parent kills and replaces any worker
  whose answer outlives the hard deadline or that dies, and scores that answer 0.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fractions
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

FINAL_ANSWER_MARKER = "**Final Answer**"
# The text inserted after the thinking (SPEC §4); the response to grade starts with it.
SUMMARY_PREFIX = "\n\n" + FINAL_ANSWER_MARKER + "\n"
THINK_END = "</think>"

# No reference in the data is longer than ~200 characters; a longer boxed answer is treated as
# missing, which bounds the work any one answer can cost (regexes, IPC, the symbolic parser).
MAX_ANSWER_CHARS = 1000
# No reference nests brackets deeper than 4, and math-verify's parser slows steeply with nesting
# (about 0.1 s per level of parentheses), so a deeper answer scores 0 without being parsed.
MAX_NESTING = 12
DEFAULT_TIMEOUT_S = 3.0
# Address space a worker may grow by beyond what it has at start (the bound turns a runaway
# big-integer computation into a MemoryError instead of an out-of-memory machine).
DEFAULT_WORKER_MEMORY_BYTES = 2 << 30

# ----------------------------------------------------------------------------------------------
# Extraction and the format gate.

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


def _gate(thinking_text: str, response: str, thinking_ended_with_eos: bool) -> bool:
  """Whether a summary may score at all: the thinking closed with `</think>`, one tag in all."""
  if thinking_ended_with_eos or not isinstance(thinking_text, str):
    return False
  if not isinstance(response, str):
    return False
  # Counting on the concatenation also catches a tag split across the two parts.
  return format_ok(thinking_text + response)


# ----------------------------------------------------------------------------------------------
# References.


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


# ----------------------------------------------------------------------------------------------
# Exact numbers and exact strings: the in-process fast path.

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(rf"[+-]?{_UNSIGNED}")
_TIMES = r"(?:\\times|\\cdot|\*|×|·)"
_SCIENTIFIC = re.compile(
    rf"([+-]?{_UNSIGNED})\s*{_TIMES}\s*10\s*\^\s*(?:\{{\s*([+-]?\d{{1,4}})\s*\}}|([+-]?\d))")
_E_NOTATION = re.compile(rf"([+-]?{_UNSIGNED})[eE]([+-]?\d{{1,4}})")
_POWER_OF_TEN = re.compile(r"([+-]?)10\s*\^\s*(?:\{\s*([+-]?\d{1,4})\s*\}|([+-]?\d))")
_FRACTION = re.compile(
    rf"([+-]?)\\[dt]?frac\s*\{{\s*([+-]?{_UNSIGNED})\s*\}}\s*\{{\s*([+-]?{_UNSIGNED})\s*\}}")
_SHORT_FRACTION = re.compile(r"([+-]?)\\[dt]?frac\s*(\d)\s*(\d)")
_SLASH_FRACTION = re.compile(rf"([+-]?{_UNSIGNED})\s*/\s*([+-]?{_UNSIGNED})")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_TRAILING_UNIT = re.compile(
    r"\s*\\(?:text|textrm|mathrm|mbox)\s*\{\s*[A-Za-z][A-Za-z .]*\}\s*$")
_TRAILING_DEGREE_OR_PERCENT = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\%|%)\s*$")
_LATEX_SPACES = re.compile(r"\\[!,;: ]|~")
_EXPONENT_LIMIT = 400  # 10^400 is still a cheap Fraction; larger goes to the symbolic path.
_MAX_NUMBER_CHARS = 200


def _parse_unsigned(text: str) -> fractions.Fraction:
  """Exact value of a matched decimal ("1,234.5" -> 2469/2)."""
  return fractions.Fraction(text.replace(",", ""))


def exact_number(text: str) -> fractions.Fraction | None:
  """The exact value of a plain numeric answer, or None if `text` is not one.

  Accepted: integers and decimals (with thousands commas "1,234.5", a sign, "$", "\\$", LaTeX
  spaces, a trailing ".", a trailing unit in \\text{...}, a trailing "%" or degree sign, both
  ignored), fractions "\\frac{a}{b}", "\\dfrac12", "a/b", and scientific notation
  "a \\times 10^{k}", "aek", "10^{k}". A comma that is not a thousands separator ("1,2") makes it
  not a number.
  """
  if not isinstance(text, str) or len(text) > _MAX_NUMBER_CHARS:
    return None
  s = text.strip().replace("\u2212", "-").replace("{,}", ",")
  s = _LATEX_SPACES.sub("", s).replace("\\$", "").replace("$", "").strip()
  for _ in range(2):
    wrapped = _TEXT_WRAP.fullmatch(s)
    if wrapped:
      s = wrapped.group(1).strip()
  s = _TRAILING_UNIT.sub("", s)
  s = _TRAILING_DEGREE_OR_PERCENT.sub("", s)
  if s.endswith(".") and not s.endswith(".."):
    s = s[:-1]
  s = s.strip()
  try:
    if _PLAIN_NUMBER.fullmatch(s):
      return _parse_unsigned(s)
    if m := _SCIENTIFIC.fullmatch(s) or _E_NOTATION.fullmatch(s):
      exponent = int(m.group(2) if m.group(2) is not None else m.group(3))
      if abs(exponent) > _EXPONENT_LIMIT:
        return None
      return _parse_unsigned(m.group(1)) * fractions.Fraction(10) ** exponent
    if m := _POWER_OF_TEN.fullmatch(s):
      exponent = int(m.group(2) if m.group(2) is not None else m.group(3))
      if abs(exponent) > _EXPONENT_LIMIT:
        return None
      return (-1 if m.group(1) == "-" else 1) * fractions.Fraction(10) ** exponent
    if m := _FRACTION.fullmatch(s) or _SHORT_FRACTION.fullmatch(s):
      sign = -1 if m.group(1) == "-" else 1
      return sign * _parse_unsigned(m.group(2)) / _parse_unsigned(m.group(3))
    if m := _SLASH_FRACTION.fullmatch(s):
      return _parse_unsigned(m.group(1)) / _parse_unsigned(m.group(2))
  except (ZeroDivisionError, ValueError):
    return None
  return None


_CANON_DROP = re.compile(r"\\left\b|\\right\b|\\[!,;: ]|~|\$")
# A space matters only between two letters ("\cot x" is not "\cotx"; "2 x" is "2x").
_CANON_SPACE = re.compile(r"(?<![A-Za-z]) | (?![A-Za-z])")


def _canonical(text: str) -> str:
  """A spelling of a LaTeX answer where equal strings mean equal answers (cheap, conservative)."""
  s = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = " ".join(_CANON_DROP.sub(" ", s).split())
  return _CANON_SPACE.sub("", s).rstrip(".")


_BRACKET_TOKEN = re.compile(r"\\.|[{}()\[\]]", re.DOTALL)


def _nesting_depth(text: str) -> int:
  """How deep (), [] and {} nest in `text` (escaped characters do not count)."""
  depth = deepest = 0
  for token in _BRACKET_TOKEN.finditer(text):
    bracket = token.group()
    if bracket in "{([":
      depth += 1
      deepest = max(deepest, depth)
    elif bracket in "})]":
      depth -= 1
  return deepest


def _fast_verdict(answer: str | None,
                  golds: tuple[str, ...]) -> tuple[float | None, tuple[str, ...]]:
  """Decides an answer without the symbolic parser where that is exact and cheap.

  Returns:
    (verdict, undecided): verdict 1.0/0.0 when decided; else None and the references that still
    need a symbolic comparison.
  """
  if answer is None or not answer or len(answer) > MAX_ANSWER_CHARS:
    return 0.0, ()
  if _nesting_depth(answer) > MAX_NESTING:
    return 0.0, ()
  value = exact_number(answer)
  canonical = _canonical(answer)
  undecided = []
  for gold in golds:
    if _canonical(gold) == canonical:
      return 1.0, ()
    gold_value = exact_number(gold)
    if value is not None and gold_value is not None:
      if value == gold_value:
        return 1.0, ()
      continue
    undecided.append(gold)
  if not undecided:
    return 0.0, ()
  return None, tuple(undecided)


# ----------------------------------------------------------------------------------------------
# The symbolic path (math-verify), run with a soft deadline.


class _SoftTimeout(BaseException):
  """Raised by SIGALRM at the soft deadline.

  A BaseException, so the broad `except Exception` clauses in sympy and math-verify cannot
  swallow it.
  """


_alarm_armed = False  # Signal handlers run in the main thread, the only one that arms them.


def _on_alarm(signum, frame):
  del signum, frame
  global _alarm_armed
  if _alarm_armed:  # A late alarm (after the work ended) must not raise anywhere else.
    _alarm_armed = False
    raise _SoftTimeout()


@contextlib.contextmanager
def _soft_deadline(seconds: float | None) -> Iterator[None]:
  """Interrupts Python-level work after `seconds` (main thread only; a no-op elsewhere).

  One deadline for the whole answer instead of math-verify's per-call alarms: those are whole
  seconds each and add up over parse(reference), parse(answer) and every compared pair.
  """
  global _alarm_armed
  if not seconds or threading.current_thread() is not threading.main_thread():
    yield
    return
  old_handler = signal.signal(signal.SIGALRM, _on_alarm)
  old_timer = signal.setitimer(signal.ITIMER_REAL, 0)
  _alarm_armed = True
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    _alarm_armed = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old_handler)
    if old_timer[0] > 0:
      signal.setitimer(signal.ITIMER_REAL, *old_timer)


_math_verify_ready = False
_parsed_golds: dict[str, list] = {}


def _math_verify():
  """Imports math-verify lazily: the parent needs it only when grading symbolically in-process."""
  global _math_verify_ready
  import math_verify  # pylint: disable=g-import-not-at-top
  if not _math_verify_ready:
    # We pass timeouts of None (our own deadline is in charge); silence the warning saying so
    # and the per-answer noise math-verify logs for unparsable text.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    _math_verify_ready = True
  return math_verify


def _exact_decimals(parsed: list) -> list:
  """Parsed answers with every Float replaced by the rational its decimal digits spell.

  math-verify rounds to 6 decimals whenever a side holds a Float (1/3 == 0.333333); with no
  Floats left it compares numbers exactly, inside tuples, sets, intervals and matrices too.
  """
  import sympy  # pylint: disable=g-import-not-at-top
  exact = []
  for item in parsed:
    if isinstance(item, (sympy.Basic, sympy.MatrixBase)):
      floats = item.atoms(sympy.Float)
      if floats:
        item = item.xreplace({f: sympy.Rational(str(f)) for f in floats})
    exact.append(item)
  return exact


def _parse_gold(gold: str) -> list:
  """math-verify's parse of a reference, memoised: one reference serves many summaries."""
  parsed = _parsed_golds.get(gold)
  if parsed is None:
    parsed = _exact_decimals(_math_verify().parse("$" + gold + "$", parsing_timeout=None))
    if len(_parsed_golds) > 4096:
      _parsed_golds.clear()
    _parsed_golds[gold] = parsed
  return parsed


def _symbolic_equal(answer: str, golds: Sequence[str]) -> bool:
  """math-verify equivalence with decimals taken exactly; may raise or run long (see callers)."""
  mv = _math_verify()
  parsed_answer = _exact_decimals(mv.parse("$\\boxed{" + answer + "}$", parsing_timeout=None))
  return bool(parsed_answer) and any(
      mv.verify(_parse_gold(gold), parsed_answer, timeout_seconds=None) for gold in golds)


def _judge(answer: str, golds: Sequence[str], soft_timeout_s: float | None) -> tuple[float, str]:
  """Symbolic verdict and how it ended ("ok", "timeout", "error"); never raises."""
  try:
    with _soft_deadline(soft_timeout_s):
      return (1.0 if _symbolic_equal(answer, golds) else 0.0), "ok"
  except _SoftTimeout:
    return 0.0, "timeout"
  except Exception:  # pylint: disable=broad-except
    # sympy/antlr raise anything on hostile input (RecursionError, MemoryError, TypeError...).
    return 0.0, "error"


# ----------------------------------------------------------------------------------------------
# Single-answer API (in-process).


def grade(response: str, reference: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
  """1.0 if the response's boxed final answer equals the reference, else 0.0.

  Never raises for any response (a bad reference raises ValueError, see `reference_answers`).
  Runs in this process. Exact numbers are safe; a symbolic answer gets a SIGALRM deadline of
  `timeout_s` when called from the main thread, which stops Python-level work but not one long
  C-level big-integer operation (the first symbolic answer also warms the parser up, ~2 s).
  For model output at scale use `Grader`, whose workers are killed.
  """
  golds = reference_answers(reference)
  answer = extract_answer(response)
  verdict, undecided = _fast_verdict(answer, golds)
  if verdict is not None:
    return verdict
  _warm_up()  # Once per process, outside the deadline: a cold parser is 10x slower at first.
  return _judge(answer, undecided, timeout_s)[0]


def score(thinking_text: str, response: str, reference: Any,
          thinking_ended_with_eos: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
  """The reward of one summary (SPEC §4): 0 unless the format gate passes, else `grade`.

  Takes the parts, not their concatenation, because extraction must look only at the response
  (a "**Final Answer**" written inside the thinking must not count) while the gate looks at all.

  Args:
    thinking_text: the generated thinking (z or z[:b_j]) plus any inserted text up to and
      including `</think>`; not the prompt.
    response: the inserted "\\n\\n**Final Answer**\\n" plus the generated summary.
    reference: see `reference_answers`.
    thinking_ended_with_eos: the thinking ended with end-of-sequence instead of `</think>`; then
      the reward is 0 at every budget, including cuts made before that end.
    timeout_s: see `grade`.
  """
  if not _gate(thinking_text, response, thinking_ended_with_eos):
    return 0.0
  return grade(response, reference, timeout_s)


# ----------------------------------------------------------------------------------------------
# The process pool.


def _address_space_bytes() -> int | None:
  """This process's virtual memory size (Linux), or None where unknown."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


_READY = "ready"  # A worker's first message: imports done, limits set, parser warmed up.
# One of each common answer shape: math-verify's ANTLR parser builds its prediction tables lazily,
# so a cold process takes ~0.4 s on its first root or tuple, ~0.02 s once warm.
_WARM_UP_ANSWERS = (
    "\\frac{1}{2}", "2\\sqrt{2}", "(3, -1)", "[0, 3)", "\\left( 0, \\frac{1}{\\sqrt{2}} \\right]",
    "\\{1, 2\\}", "(-\\infty, 0] \\cup (1, \\infty)", "x^2 + 2x + 1", "\\pi", "6 - 5i", "10\\%",
    "90^\\circ", "\\text{a}", "x = 3", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "e^{2}",
    "\\sin \\frac{\\pi}{6}", "\\log_2 8", "3 \\times 10^{8}", "\\dfrac{\\sqrt{3}}{2}", "2^{10}")
_warmed_up = False


def _warm_up() -> None:
  """Parses one answer of each common shape, so the first real answers run at full speed."""
  global _warmed_up
  if _warmed_up:
    return
  _warmed_up = True
  for answer in _WARM_UP_ANSWERS:
    _judge(answer, ("1",), None)


def _worker_main(conn: multiprocessing.connection.Connection, soft_timeout_s: float,
                 memory_bytes: int | None, answer_hook: Callable[[str], None] | None) -> None:
  """Says "ready", then grades (serial, answer, golds) messages until None or the parent leaves."""
  # Ctrl-C reaches the whole process group; the parent handles it and kills us.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if memory_bytes:
    current = _address_space_bytes()
    if current is not None:
      try:
        import resource  # pylint: disable=g-import-not-at-top
        limit = current + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
      except (ImportError, ValueError, OSError):
        pass
  _warm_up()
  try:
    conn.send(_READY)
  except (OSError, ValueError):
    return
  while True:
    try:
      message = conn.recv()
    except (EOFError, OSError):
      return
    if message is None:
      return
    serial, answer, golds = message
    if answer_hook is not None:
      try:
        answer_hook(answer)
      except Exception:  # pylint: disable=broad-except
        pass
    verdict, how = _judge(answer, golds, soft_timeout_s)
    try:
      conn.send((serial, verdict, how))
    except (OSError, ValueError):
      return


# A worker gets this long to import and say "ready" once it has an answer; that answer's clock
# starts only then.
_STARTUP_TIMEOUT_S = 120.0
# This many workers in a row dying before "ready" means the environment is broken (e.g. a main
# module without `if __name__ == "__main__":` that the workers re-run), not an answer.
_MAX_STARTUP_FAILURES = 3


@dataclasses.dataclass
class _Worker:
  """A worker process, its pipe and the task in flight (key None when idle)."""
  process: Any
  conn: multiprocessing.connection.Connection
  ready: bool = False
  key: Any = None
  serial: int = -1
  deadline: float = 0.0

  def arm(self, timeout_s: float) -> None:
    """Starts the clock of the answer in flight; the answer's own clock waits for "ready"."""
    if self.key is not None:
      self.deadline = time.monotonic() + (timeout_s if self.ready else _STARTUP_TIMEOUT_S)


class Grader:
  """Grades batches of responses; symbolic answers run in a pool of killable worker processes.

  Per response the parent extracts the answer and decides in-process what is exact and cheap
  (missing or over-long answers, exact numbers, identical LaTeX), whatever the batch size: that is
  all of GSM8K and needs no workers. The rest is deduplicated, looked up in an LRU cache of
  earlier verdicts, and sent one answer at a time to the workers. An answer whose worker has not
  replied within `timeout_s`, or whose worker died on it, scores 0; the worker is killed (SIGKILL)
  and replaced. Workers also stop their own work at 0.8 * `timeout_s` (SIGALRM) so that ordinary
  slow sympy work costs no restart.

  Workers come from a "forkserver" context by default (the parent may have JAX threads, which a
  plain fork would copy in a broken state); the fork server preloads this module and math-verify
  once (this sets the process-wide forkserver preload list), so a replacement worker starts in
  milliseconds. "spawn" also works, with a few seconds of imports per new worker. As with any
  non-fork start method, a script that uses a Grader needs the `if __name__ == "__main__":` guard;
  without it workers die at start and `grade_batch` raises RuntimeError after a few tries.
  Workers start on first need (or `start()`); `close()` (or leaving the `with` block) kills them
  all. Not thread-safe: use one Grader per thread.
  """

  def __init__(self, num_workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, *,
               start_method: str = "forkserver",
               worker_memory_bytes: int | None = DEFAULT_WORKER_MEMORY_BYTES,
               cache_size: int = 1 << 16,
               answer_hook: Callable[[str], None] | None = None):
    """Configures the pool; no process starts here.

    Args:
      num_workers: worker processes (default: min(8, CPU count)).
      timeout_s: per-answer hard deadline in seconds, from when a ready worker receives it.
      start_method: "forkserver" or "spawn" ("fork" is refused: see the class docstring).
      worker_memory_bytes: address space a worker may add to its start size; None: unlimited.
      cache_size: verdicts remembered across batches (0 disables the cache).
      answer_hook: test-only: a picklable function the worker calls with each answer before
        grading it (to inject crashes and hangs).
    """
    if start_method not in ("forkserver", "spawn"):
      raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    self.num_workers = max(1, num_workers or min(8, os.cpu_count() or 1))
    self.timeout_s = float(timeout_s)
    self.start_method = start_method
    self.worker_memory_bytes = worker_memory_bytes
    self.cache_size = cache_size
    self.answer_hook = answer_hook
    self.stats: collections.Counter[str] = collections.Counter()
    self._cache: collections.OrderedDict[tuple[str, tuple[str, ...]], float] = (
        collections.OrderedDict())
    self._workers: list[_Worker] = []
    self._context = None
    self._serial = 0
    self._startup_failures = 0
    self._owner_pid = os.getpid()

  # -- lifecycle --

  def __enter__(self) -> Grader:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def start(self) -> None:
    """Starts the workers now (otherwise the first batch that needs them does)."""
    if os.getpid() != self._owner_pid:
      raise RuntimeError("a Grader cannot be used in a process forked from its creator")
    if self._context is None:
      self._context = multiprocessing.get_context(self.start_method)
      if self.start_method == "forkserver":
        self._context.set_forkserver_preload(["__main__", __name__, "math_verify"])
    while len(self._workers) < self.num_workers:
      self._workers.append(self._new_worker())

  def close(self) -> None:
    """Stops and reaps every worker; the Grader may be used again (workers restart)."""
    workers, self._workers = self._workers, []
    if os.getpid() != self._owner_pid:
      return  # A forked copy of this object: the workers belong to the parent, leave them be.
    for worker in workers:
      if worker.key is None:
        with contextlib.suppress(Exception):
          worker.conn.send(None)
    deadline = time.monotonic() + 1.0
    for worker in workers:
      with contextlib.suppress(Exception):
        worker.process.join(max(0.0, deadline - time.monotonic()))
      self._kill(worker)

  def worker_pids(self) -> list[int]:
    """Process ids of the current workers (for monitoring and leak checks)."""
    return [w.process.pid for w in self._workers]

  def _new_worker(self) -> _Worker:
    parent_conn, child_conn = self._context.Pipe(duplex=True)
    process = self._context.Process(
        target=_worker_main, name="brpo-grader", daemon=True,
        args=(child_conn, 0.8 * self.timeout_s, self.worker_memory_bytes, self.answer_hook))
    process.start()
    child_conn.close()
    self.stats["workers_started"] += 1
    return _Worker(process=process, conn=parent_conn)

  @staticmethod
  def _kill(worker: _Worker) -> None:
    with contextlib.suppress(Exception):
      if worker.process.is_alive():
        worker.process.kill()
      worker.process.join(5.0)
    with contextlib.suppress(Exception):
      worker.process.close()
    with contextlib.suppress(Exception):
      worker.conn.close()

  def _replace(self, worker: _Worker) -> None:
    """Kills a worker and starts another in its slot; a worker that never got ready is counted."""
    self._kill(worker)
    if not worker.ready:
      self._startup_failures += 1
      if self._startup_failures >= _MAX_STARTUP_FAILURES:
        self.close()
        self._startup_failures = 0
        raise RuntimeError(
            f"{_MAX_STARTUP_FAILURES} grader workers in a row died before they were ready; is the "
            "main module guarded by `if __name__ == \"__main__\":`? (see brpo.rewards.Grader)")
    self._workers[self._workers.index(worker)] = self._new_worker()

  # -- grading --

  def grade_batch(self, responses: Sequence[str | None],
                  references: Sequence[Any]) -> np.ndarray:
    """Grades responses against references (no format gate).

    Args:
      responses: [n] responses (see `extract_answer`); None or non-strings score 0.
      references: [n] references (see `reference_answers`).

    Returns:
      [n] float32 of 1.0 (correct) and 0.0.
    """
    return self._grade(responses, references, None, None)

  def score_batch(self, thinking_texts: Sequence[str], responses: Sequence[str | None],
                  references: Sequence[Any],
                  thinking_ended_with_eos: Sequence[bool] | None = None) -> np.ndarray:
    """Rewards of n summaries (SPEC §4): `score` for each, in one batch.

    Args:
      thinking_texts: [n] thinking plus inserted text, up to and including `</think>`.
      responses: [n] responses.
      references: [n] references.
      thinking_ended_with_eos: [n] bools, or None for all False.

    Returns:
      [n] float32 rewards in {0, 1}.
    """
    n = len(responses)
    if len(thinking_texts) != n:
      raise ValueError(f"{len(thinking_texts)} thinking texts for {n} responses")
    eos = [False] * n if thinking_ended_with_eos is None else list(thinking_ended_with_eos)
    if len(eos) != n:
      raise ValueError(f"{len(eos)} end-of-sequence flags for {n} responses")
    return self._grade(responses, references, thinking_texts, eos)

  def grade(self, response: str, reference: Any) -> float:
    """`grade` for one response, with this pool's hard deadline."""
    return float(self.grade_batch([response], [reference])[0])

  def _grade(self, responses, references, thinking_texts, eos) -> np.ndarray:
    n = len(responses)
    if len(references) != n:
      raise ValueError(f"{len(references)} references for {n} responses")
    # Reference errors surface here, before any work, naming the item.
    golds = []
    for i, reference in enumerate(references):
      try:
        golds.append(reference_answers(reference))
      except ValueError as e:
        raise ValueError(f"reference {i}: {e}") from None
    scores = np.zeros(n, np.float32)
    waiting: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for i in range(n):
      self.stats["answers"] += 1
      if thinking_texts is not None and not _gate(thinking_texts[i], responses[i], eos[i]):
        self.stats["gated"] += 1
        continue
      answer = extract_answer(responses[i])
      verdict, undecided = _fast_verdict(answer, golds[i])
      if verdict is not None:
        self.stats["in_process"] += 1
        scores[i] = verdict
        continue
      key = (answer, undecided)
      cached = self._cache.get(key)
      if cached is not None:
        self._cache.move_to_end(key)
        self.stats["cached"] += 1
        scores[i] = cached
        continue
      waiting.setdefault(key, []).append(i)
    if waiting:
      self.stats["pool"] += len(waiting)
      started = time.monotonic()
      verdicts = self._run_pool(list(waiting))
      self.stats["pool_ms"] += round(1000 * (time.monotonic() - started))
      for key, verdict in verdicts.items():
        scores[waiting[key]] = verdict
        if self.cache_size > 0:
          self._cache[key] = verdict
          if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
    return scores

  def _run_pool(self, keys: list[tuple[str, tuple[str, ...]]]) -> dict[Any, float]:
    """Grades distinct (answer, golds) keys in the workers; every key gets a verdict."""
    queue = collections.deque(keys)
    verdicts: dict[Any, float] = {}
    try:
      self.start()
      while queue or any(w.key is not None for w in self._workers):
        for worker in list(self._workers):
          if worker.key is None and queue:
            self._dispatch(worker, queue)
        busy = [w for w in self._workers if w.key is not None]
        if not busy:
          continue
        wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        ready = multiprocessing.connection.wait(
            [w.conn for w in busy] + [w.process.sentinel for w in busy], wait_s)
        for worker in busy:
          if worker.conn in ready or worker.process.sentinel in ready:
            self._collect(worker, queue, verdicts)
          if worker.key is not None and time.monotonic() >= worker.deadline:
            self._fail(worker, queue, verdicts, "timeouts")
    except BaseException:
      # Interrupted mid-batch (e.g. KeyboardInterrupt): in-flight replies would be stale.
      self.close()
      raise
    return verdicts

  def _dispatch(self, worker: _Worker, queue: collections.deque) -> None:
    key = queue.popleft()
    self._serial += 1
    try:
      worker.conn.send((self._serial, key[0], key[1]))
    except (OSError, ValueError):
      # The worker died while idle; the answer never started, so it goes back in line.
      queue.appendleft(key)
      self._replace(worker)
      return
    worker.key, worker.serial = key, self._serial
    worker.arm(self.timeout_s)

  def _collect(self, worker: _Worker, queue: collections.deque,
               verdicts: dict[Any, float]) -> None:
    """Reads what a worker sent; if it died without answering, fails its answer."""
    dead = False
    try:
      while worker.key is not None and worker.conn.poll():
        message = worker.conn.recv()
        if message == _READY:
          worker.ready = True
          self._startup_failures = 0
          worker.arm(self.timeout_s)
          continue
        serial, verdict, how = message
        if serial == worker.serial:
          verdicts[worker.key] = float(verdict)
          worker.key = None
          if how != "ok":
            self.stats[f"soft_{how}s"] += 1
    except Exception:  # pylint: disable=broad-except
      dead = True  # EOF, or a garbled reply from a worker dying mid-send.
    if worker.key is not None and (dead or not worker.process.is_alive()):
      self._fail(worker, queue, verdicts, "crashes")

  def _fail(self, worker: _Worker, queue: collections.deque, verdicts: dict[Any, float],
            reason: str) -> None:
    """The worker hung or died on its answer: the answer scores 0, the worker is replaced.

    A worker that never got ready had not started the answer, so that goes back in line.
    """
    if worker.ready:
      self.stats[reason] += 1
      verdicts[worker.key] = 0.0
    else:
      self.stats["startup_" + reason] += 1
      queue.appendleft(worker.key)
    worker.key = None
    self._replace(worker)


def grade_batch(responses: Sequence[str | None], references: Sequence[Any],
                **grader_kwargs) -> np.ndarray:
  """`Grader.grade_batch` with a temporary pool (closed before returning)."""
  with Grader(**grader_kwargs) as grader:
    return grader.grade_batch(responses, references)


def score_batch(thinking_texts: Sequence[str], responses: Sequence[str | None],
                references: Sequence[Any], thinking_ended_with_eos: Sequence[bool] | None = None,
                **grader_kwargs) -> np.ndarray:
  """`Grader.score_batch` with a temporary pool (closed before returning)."""
  with Grader(**grader_kwargs) as grader:
    return grader.score_batch(thinking_texts, responses, references, thinking_ended_with_eos)


def _in_fork_server() -> bool:
  """Whether this process is a multiprocessing fork server (Linux; False where unknown)."""
  try:
    with open("/proc/self/cmdline", "rb") as f:
      return b"multiprocessing.forkserver import main" in f.read()
  except OSError:
    return False


# A fork server that preloads this module (Grader sets that up) exists to fork grader workers:
# warming math-verify here once makes every worker forked from it start warm, instead of each
# worker (and each replacement of a killed one) paying ~2 s of warm-up.
if _in_fork_server():
  _warm_up()
