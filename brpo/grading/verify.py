"""The symbolic path: math-verify equivalence under a soft (SIGALRM) deadline.

- Answers the exact path (`brpo.grading.exact`) leaves undecided go through math-verify (reference
  as "$ref$", answer as "$\\boxed{ans}$"). It rounds to 6 decimals whenever a side holds a float,
  so decimals are first replaced by the rationals they spell: then 0.333333 != 1/3 and
  1.414214 != sqrt 2, in tuples and sets too.
- math-verify can hang or blow up memory on hostile LaTeX (power towers, 100000!, deep brackets):
  its signal-based timeouts cannot stop a long C-level computation. So the Grader runs this module
  in killable workers (`brpo.grading.pool`); here each answer only gets a soft deadline that stops
  Python-level work. An answer stopped by either deadline scores 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence

DEFAULT_TIMEOUT_S = 3.0

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


def judge(answer: str, golds: Sequence[str], soft_timeout_s: float | None) -> tuple[float, str]:
  """Symbolic verdict and how it ended ("ok", "timeout", "error"); never raises."""
  try:
    with _soft_deadline(soft_timeout_s):
      return (1.0 if _symbolic_equal(answer, golds) else 0.0), "ok"
  except _SoftTimeout:
    return 0.0, "timeout"
  except Exception:  # pylint: disable=broad-except
    # sympy/antlr raise anything on hostile input (RecursionError, MemoryError, TypeError...).
    return 0.0, "error"


# One of each common answer shape: math-verify's ANTLR parser builds its prediction tables lazily,
# so a cold process takes ~0.4 s on its first root or tuple, ~0.02 s once warm.
_WARM_UP_ANSWERS = (
    "\\frac{1}{2}", "2\\sqrt{2}", "(3, -1)", "[0, 3)", "\\left( 0, \\frac{1}{\\sqrt{2}} \\right]",
    "\\{1, 2\\}", "(-\\infty, 0] \\cup (1, \\infty)", "x^2 + 2x + 1", "\\pi", "6 - 5i", "10\\%",
    "90^\\circ", "\\text{a}", "x = 3", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "e^{2}",
    "\\sin \\frac{\\pi}{6}", "\\log_2 8", "3 \\times 10^{8}", "\\dfrac{\\sqrt{3}}{2}", "2^{10}")
_warmed_up = False


def warm_up() -> None:
  """Parses one answer of each common shape, so the first real answers run at full speed."""
  global _warmed_up
  if _warmed_up:
    return
  _warmed_up = True
  for answer in _WARM_UP_ANSWERS:
    judge(answer, ("1",), None)


Task = tuple[str, tuple[str, ...]]  # (answer, references the exact path left undecided)


def worker_handler(answer_hook: Callable[[str], None] | None,
                   soft_timeout_s: float) -> Callable[[Task], tuple[float, str]]:
  """Worker set-up for `brpo.grading.pool`: warms the parser, returns the per-answer function.

  Args:
    answer_hook: test-only: a picklable function called with each answer before it is judged (to
      inject crashes and hangs); its exceptions are ignored.
    soft_timeout_s: the soft deadline of each answer.

  Returns:
    A function of (answer, undecided references) -> (verdict, how), as `judge`.
  """
  warm_up()

  def handle(task: Task) -> tuple[float, str]:
    answer, golds = task
    if answer_hook is not None:
      try:
        answer_hook(answer)
      except Exception:  # pylint: disable=broad-except
        pass
    return judge(answer, golds, soft_timeout_s)

  return handle


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
  warm_up()
