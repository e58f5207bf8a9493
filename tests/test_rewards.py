"""Tests of brpo.grading: answer extraction, exact grading, the format gate and the killable pool.

Fixtures under tests/fixtures/rewards/ are hand-written; nothing here reads /work/shared.
"""

import collections
import fractions
import json
import multiprocessing
import os
import pathlib
import signal
import sys
import time
import types

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from brpo import grading
from brpo.grading import pool

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "rewards"
GSM8K = [json.loads(line) for line in (FIXTURES / "gsm8k_style.jsonl").read_text().splitlines()]
MATH = json.loads((FIXTURES / "math_style.json").read_text())
PREFIX = grading.SUMMARY_PREFIX
THINKING = "Let me add the numbers step by step.</think>"


def summary(answer: str) -> str:
  """A response as the rollout builds it: the inserted marker, then a boxed answer."""
  return PREFIX + "\\boxed{" + answer + "}"


def gsm8k_gold(solution: str) -> str:
  return solution.rsplit("####", 1)[1].strip()


# Test-only worker hooks; the workers import this module by name to unpickle them.
def fault_hook(answer: str) -> None:
  if answer == "CRASH":
    os._exit(3)
  if answer == "SEGFAULT":
    os.kill(os.getpid(), signal.SIGSEGV)
  if answer == "HANG":
    # Blocking SIGALRM defeats the worker's soft deadline: only the parent's kill can end this.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(3600)


def hang_hook(answer: str) -> None:
  """Every answer hangs its worker (SIGALRM blocked) until the parent kills it."""
  del answer
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
  time.sleep(3600)


def _descendants() -> set[int]:
  """Live descendant pids, without multiprocessing's own helper processes.

  The fork server and the resource tracker are per-process singletons of multiprocessing that
  live until this process exits. The grader's workers are the fork server's children (with the
  same command line, being forks of it), so only direct children are recognised as helpers.
  """
  processes = {}  # pid -> (parent pid, command line), from /proc.
  for entry in pathlib.Path("/proc").iterdir():
    if entry.name.isdigit():
      try:
        stat = (entry / "stat").read_text()
        cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
      except OSError:
        continue
      fields = stat.rsplit(")", 1)[1].split()
      if fields[0] != "Z":
        processes[int(entry.name)] = (int(fields[1]), cmdline)
  found, frontier = set(), {os.getpid()}
  while frontier:
    frontier = {pid for pid, (ppid, _) in processes.items() if ppid in frontier} - found
    found |= frontier
  helpers = {pid for pid in found if processes[pid][0] == os.getpid() and (
      "multiprocessing.forkserver" in processes[pid][1] or "resource_tracker" in processes[pid][1])}
  return found - helpers


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _assert_no_workers_left(pids: list[int], before: set[int]) -> None:
  assert not [p for p in pids if _alive(p)]
  assert not [p for p in multiprocessing.active_children() if p.pid in pids]
  assert _descendants() - before == set()


@pytest.fixture(scope="module")
def grader():
  with grading.Grader(num_workers=2, timeout_s=3.0) as g:
    yield g


# ----------------------------------------------------------------------------------------------
# Extraction.


@pytest.mark.parametrize("response, expected", [
    (PREFIX + "\\boxed{72}", "72"),
    (PREFIX + "So the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    (PREFIX + "\\boxed{1} or rather \\boxed{2}", "2"),  # The last box of the paragraph.
    (PREFIX + "\\boxed {3}", "3"),
    (PREFIX + "\\fbox{4}", "4"),
    (PREFIX + "\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # Escaped braces do not close the box.
    (PREFIX + "\\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),
    (PREFIX + "\\boxed{ 5 }", "5"),
    ("**Final Answer**\n\\boxed{6}", "6"),
    (PREFIX + "line one\nline two \\boxed{7}\n", "7"),  # A single newline is not a blank line.
    (PREFIX + "\\boxed{8}\n\n**Final Answer**\n\\boxed{9}", "8"),  # First marked paragraph.
    (PREFIX + "\\boxed{é∑}", "é∑"),
])
def test_extract_answer(response, expected):
  assert grading.extract_answer(response) == expected


@pytest.mark.parametrize("response", [
    "",
    "\\boxed{72}",  # No marker.
    PREFIX + "The answer is 72.",  # No box.
    PREFIX + "The answer is 72.\n\n\\boxed{72}",  # Box outside the marked paragraph.
    PREFIX + "Still unsure.\n \n**Final Answer**\n\\boxed{72}",  # Whitespace-only line is blank.
    PREFIX + "\\boxed{72",  # Unclosed (a summary cut at S tokens).
    PREFIX + "\\boxed{72} then \\boxed{7",  # The last box is unclosed: no earlier fallback.
    PREFIX + "\\boxed{}",
    PREFIX + "\\boxedx{72}",
    "The answer is \\boxed{72}.\n\n**Final Answer**\nsee above",
    PREFIX + "\\boxed{" + "1" * (grading.MAX_ANSWER_CHARS + 1) + "}",
    None,
])
def test_extract_answer_none(response):
  assert grading.extract_answer(response) is None


# ----------------------------------------------------------------------------------------------
# References and exact numbers.


@pytest.mark.parametrize("reference, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", ("72",)),
    ("#### 1,234", ("1,234",)),
    (142.0, ("142",)),
    (2.5, ("2.5",)),
    (7, ("7",)),
    ("$\\frac{1}{2 n+2}$", ("\\frac{1}{2 n+2}",)),
    ("9.6\n", ("9.6",)),
    ("\\boxed{5}", ("5",)),
    (["0.01\n", "0.02\n", "0.01"], ("0.01", "0.02")),
    ("\\boxed{1}+\\boxed{2}", ("\\boxed{1}+\\boxed{2}",)),  # Not one box around everything.
])
def test_reference_answers(reference, expected):
  assert grading.reference_answers(reference) == expected
  assert grading.reference_answer(reference) == expected[0]


@pytest.mark.parametrize("reference", [None, True, float("nan"), "", "  $ $ ", [], ["", None],
                                       {"a": 1}])
def test_reference_answers_reject_bad_data(reference):
  with pytest.raises(ValueError):
    grading.reference_answers(reference)


@pytest.mark.parametrize("text, expected", [
    ("72", 72), ("72.0", 72), ("72.00", 72), ("72.", 72), ("$72", 72), ("\\$72", 72),
    (" 1,234 ", 1234), ("1{,}234", 1234), ("1,\\!234", 1234), ("-5", -5), ("\u22125", -5),
    ("0.5", fractions.Fraction(1, 2)), (".5", fractions.Fraction(1, 2)),
    ("\\frac{1}{3}", fractions.Fraction(1, 3)), ("\\dfrac12", fractions.Fraction(1, 2)),
    ("-\\frac{3}{4}", fractions.Fraction(-3, 4)), ("3/4", fractions.Fraction(3, 4)),
    ("8.7 \\times 10^{8}", 870000000), ("4.4e7", 44000000),
    ("10^{-3}", fractions.Fraction(1, 1000)),
    ("18 \\text{ dollars}", 18), ("\\text{18}", 18), ("25\\%", 25), ("90^\\circ", 90),
    ("0.333", fractions.Fraction(333, 1000)),
])
def test_exact_number(text, expected):
  assert grading.exact_number(text) == expected


@pytest.mark.parametrize("text", ["1,2", "12,34", "x", "2^3", "\\sqrt{2}", "1/0", "", "1..",
                                  "10^{100000}", "9" * 300, "3 \\text{ and } 4"])
def test_exact_number_rejects(text):
  assert grading.exact_number(text) is None


# ----------------------------------------------------------------------------------------------
# Grading: GSM8K style.


def test_gsm8k_fixture_is_the_promised_size():
  assert len(GSM8K) >= 30 and len(MATH) >= 20


@pytest.mark.parametrize("row", GSM8K, ids=lambda r: gsm8k_gold(r["answer"]))
def test_gsm8k_gold_grades_correct(row):
  gold = gsm8k_gold(row["answer"])
  value = fractions.Fraction(gold.replace(",", ""))
  assert grading.grade(summary(gold), row["answer"]) == 1.0
  # Other spellings of the same number.
  assert grading.grade(summary(f"{float(value):.2f}"), row["answer"]) == 1.0
  assert grading.grade(summary("\\$" + gold), row["answer"]) == 1.0
  assert grading.grade(summary(gold + "."), row["answer"]) == 1.0


@pytest.mark.parametrize("row", GSM8K, ids=lambda r: gsm8k_gold(r["answer"]))
def test_gsm8k_perturbed_grades_wrong(row):
  gold = gsm8k_gold(row["answer"])
  value = fractions.Fraction(gold.replace(",", ""))
  reference = row["answer"]
  perturbed = [
      summary(str(value + 1)),  # Off by one.
      summary(str(value - 1)),
      summary(f"{float(value) + 0.1:.1f}"),  # A different decimal.
      summary(f"{float(value):.2f}1"),
      PREFIX + gold,  # Missing box.
      PREFIX + "The answer is " + gold + ".\n\n\\boxed{" + gold + "}",  # Box outside.
      PREFIX + "I am not sure yet.\n\n**Final Answer**\n\\boxed{" + gold + "}",  # Not first.
      PREFIX + "\\boxed{" + str(value + 1) + "}\n\n**Final Answer**\n\\boxed{" + gold + "}",
      "\\boxed{" + gold + "}",  # No marker at all.
      PREFIX + "\\boxed{" + gold,  # Never closed.
  ]
  for response in perturbed:
    assert grading.grade(response, reference) == 0.0, response


def test_no_relative_tolerance():
  assert grading.grade(summary("0.333"), "\\frac{1}{3}") == 0.0
  assert grading.grade(summary("0.333333"), "\\frac{1}{3}") == 0.0
  assert grading.grade(summary("1000001"), "1000000") == 0.0
  assert grading.grade(summary("1.414214"), "\\sqrt{2}") == 0.0
  assert grading.grade(summary("0.5"), "\\frac{1}{2}") == 1.0


@pytest.mark.parametrize("answer, reference, expected", [
    ("5+7-3", "9", 0.0),  # The arithmetic task's question, boxed (issue #25's reward hack).
    ("8-7+3-2", "2", 0.0),
    ("12 \\times 3", "36", 0.0),
    ("2^{3}", "8", 0.0),
    ("\\frac{1}{2}+1", "1.5", 0.0),
    ("x=5+4", "9", 0.0),
    ("5+7-3=9", "9", 1.0),  # A worked answer: its right-hand side is graded.
    ("5+7-3=8", "9", 0.0),
    ("-9", "-9", 1.0),  # Signs, fractions, scientific notation are numbers, not arithmetic.
    ("\\frac{18}{2}", "9", 1.0),
    ("1.2 \\times 10^{1}", "12", 1.0),
    ("x = 9", "9", 1.0),
    ("\\sqrt{81}", "9", 1.0),
    ("3+\\sqrt{2}", "3+\\sqrt{2}", 1.0),  # A symbolic reference keeps the symbolic path.
    ("\\sqrt{2}+3", "3+\\sqrt{2}", 1.0),
])
def test_unevaluated_arithmetic_is_not_an_answer(answer, reference, expected):
  assert grading.grade(summary(answer), reference) == expected


def test_list_reference_accepts_any():
  assert grading.grade(summary("0.02"), ["0.01\n", "0.02\n"]) == 1.0
  assert grading.grade(summary("0.03"), ["0.01\n", "0.02\n"]) == 0.0


# ----------------------------------------------------------------------------------------------
# Grading: MATH style (math-verify, in-process and through the pool).


MATH_CASES = [(row["answer"], answer, 1.0) for row in MATH for answer in row["equivalent"]] + [
    (row["answer"], answer, 0.0) for row in MATH for answer in row["wrong"]]


@pytest.mark.parametrize("reference, answer, expected", MATH_CASES,
                         ids=[f"{r}|{a}" for r, a, _ in MATH_CASES])
def test_math_style_in_process(reference, answer, expected):
  assert grading.grade(summary(answer), reference) == expected


def test_math_style_through_pool_agrees(grader):
  references = [r for r, _, _ in MATH_CASES]
  responses = [summary(a) for _, a, _ in MATH_CASES]
  expected = np.array([e for _, _, e in MATH_CASES], np.float32)
  scores = grader.grade_batch(responses, references)
  assert scores.dtype == np.float32 and scores.shape == expected.shape
  np.testing.assert_array_equal(scores, expected)
  assert grader.stats["pool"] > 0 and grader.stats["in_process"] > 0
  # A second pass is served from the cache, with the same verdicts.
  pooled = grader.stats["pool"]
  np.testing.assert_array_equal(grader.grade_batch(responses, references), expected)
  assert grader.stats["pool"] == pooled


PATHOLOGICAL = [
    summary("9^{9^{9^{9}}}"),
    summary("10^{10^{10^{10}}}"),
    summary("(10^{100})!"),
    summary("\\binom{10^{9}}{10^{8}}"),
    summary("{" * 12 + "1" + "}" * 12),
    summary("(" * 10 + "1" + ")" * 10),
    summary("{" * 5000 + "1" + "}" * 5000),
    summary("\\frac{" * 300),
    summary("\\left(\\right." * 40),
    summary("x" * (2 << 20)),
    PREFIX + "\\boxed{" + "{" * (2 << 20),
    PREFIX + "\\boxed{9}" * 50000,  # Many boxes; the last is right: this one is correct.
    summary("\ud800\udfff\u202e\x00∞"),
    summary("\\begin{pmatrix}" * 50),
    summary("1" * 999),
    summary("9" * 5000),
]


def test_pathological_inputs_score_zero_through_pool():
  with grading.Grader(num_workers=2, timeout_s=1.0) as g:
    scores = g.grade_batch(PATHOLOGICAL + [summary("9")], ["9"] * (len(PATHOLOGICAL) + 1))
    expected = np.zeros(len(PATHOLOGICAL) + 1, np.float32)
    expected[PATHOLOGICAL.index(PREFIX + "\\boxed{9}" * 50000)] = 1.0
    expected[-1] = 1.0
    np.testing.assert_array_equal(scores, expected)
    # Many `</think>`: the answer is right, the format gate is not.
    many = ["reasoning" + "</think>" * 100000, THINKING]
    np.testing.assert_array_equal(
        g.score_batch(many, [summary("9"), summary("9" + "</think>" * 100000)], ["9", "9"]),
        [0.0, 0.0])
    # The pool still grades normally afterwards.
    np.testing.assert_array_equal(
        g.grade_batch([summary("\\sqrt{8}"), summary("3")], ["2\\sqrt{2}", "2\\sqrt{2}"]),
        [1.0, 0.0])


def test_pathological_inputs_in_process_never_raise():
  # Only inputs whose slow work is Python-level: the soft deadline ends it.
  for response in [summary("9^{9^{9^{9}}}"), summary("\\frac{" * 300), summary("x" * (1 << 20)),
                   "</think>" * 1000, summary("\ud800"), summary("{" * 40 + "}" * 40)]:
    assert grading.grade(response, "9", timeout_s=0.5) == 0.0


# ----------------------------------------------------------------------------------------------
# The format gate.


@pytest.mark.parametrize("text, expected", [
    ("thinking</think>\n\n**Final Answer**\n\\boxed{1}", True),
    ("thinking...\n\n...\n\n</think>\n\n**Final Answer**\n\\boxed{1}", True),
    ("thinking\n\n**Final Answer**\n\\boxed{1}", False),
    ("a</think>b</think>\n\n**Final Answer**\n\\boxed{1}", False),
    ("</think>" * 3, False),
    ("</think >", False),
])
def test_format_ok(text, expected):
  assert grading.format_ok(text) == expected


def test_score_gate_and_eos():
  reference = "#### 72"
  assert grading.score(THINKING, summary("72"), reference) == 1.0
  assert grading.score(THINKING, summary("71"), reference) == 0.0
  # Correct answer, but the thinking ended with end-of-sequence: 0 at every budget.
  assert grading.score(THINKING, summary("72"), reference, thinking_ended_with_eos=True) == 0.0
  # No `</think>` at all, or a second one in the summary.
  assert grading.score("Let me add.", summary("72"), reference) == 0.0
  assert grading.score(THINKING, PREFIX + "</think>\\boxed{72}", reference) == 0.0
  assert grading.score(THINKING + "</think>", summary("72"), reference) == 0.0
  # A tag split across the two parts still counts (the gate reads their concatenation).
  assert grading.score("Let me add.</thi", "nk>" + summary("72"), reference) == 1.0
  assert grading.score(THINKING + "</thi", "nk>" + summary("72"), reference) == 0.0
  # A cut thinking: the inserted text carries the one `</think>`.
  cut = "Let me add 48 and 24" + "...\n\n...\n\n</think>"
  assert grading.score(cut, summary("72"), reference) == 1.0


def test_score_batch_matches_score(grader):
  thinkings = [THINKING, THINKING, "no tag", THINKING + "</think>", THINKING, THINKING]
  responses = [summary("72"), summary("72"), summary("72"), summary("72"), summary("\\sqrt{8}"),
               None]
  references = ["#### 72", "#### 72", "#### 72", "#### 72", "2\\sqrt{2}", "#### 72"]
  eos = [False, True, False, False, False, False]
  expected = [grading.score(t, r, ref, e) if r is not None else 0.0
              for t, r, ref, e in zip(thinkings, responses, references, eos)]
  assert expected == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
  np.testing.assert_array_equal(grader.score_batch(thinkings, responses, references, eos),
                                expected)


def test_batch_argument_errors(grader):
  with pytest.raises(ValueError, match="references"):
    grader.grade_batch([summary("1")], [])
  with pytest.raises(ValueError, match="reference 1"):
    grader.grade_batch([summary("1"), summary("2")], ["1", None])
  with pytest.raises(ValueError, match="thinking"):
    grader.score_batch([], [summary("1")], ["1"])


# ----------------------------------------------------------------------------------------------
# Pool robustness and cleanup.


def test_crashing_and_hanging_workers_score_zero_and_pool_recovers():
  before = _descendants()
  with grading.Grader(num_workers=2, timeout_s=1.0, answer_hook=fault_hook) as g:
    g.start()
    first_pids = g.worker_pids()
    responses = [summary("CRASH"), summary("\\sqrt{8}"), summary("HANG"), summary("SEGFAULT"),
                 summary("2^{3}"), summary("HANG"), summary("\\frac{6}{4}")]
    references = ["1", "2\\sqrt{2}", "1", "1", "2^3", "2", "\\frac{3}{2}"]
    scores = g.grade_batch(responses, references)
    np.testing.assert_array_equal(scores, [0, 1, 0, 0, 1, 0, 1])
    assert g.stats["crashes"] == 2 and g.stats["timeouts"] == 2
    assert g.stats["workers_started"] == 2 + 4
    assert len(g.worker_pids()) == 2 and not set(g.worker_pids()) & set(first_pids)
    assert not [p for p in first_pids if _alive(p)]
    # The replacements grade normally.
    np.testing.assert_array_equal(
        g.grade_batch([summary("\\sqrt{12}"), summary("x+1")], ["2\\sqrt{3}", "x + 2"]), [1, 0])
    pids = g.worker_pids()
  _assert_no_workers_left(first_pids + pids, before)


def test_close_leaves_no_workers_and_grader_restarts():
  before = _descendants()
  g = grading.Grader(num_workers=2)
  assert g.worker_pids() == []  # Nothing starts before it is needed.
  np.testing.assert_array_equal(g.grade_batch([summary("72")], ["#### 72"]), [1.0])
  assert g.worker_pids() == []  # Exact numbers never need a worker.
  np.testing.assert_array_equal(g.grade_batch([summary("\\sqrt{4}")], ["2"]), [1.0])
  pids = g.worker_pids()
  assert len(pids) == 2 and all(_alive(p) for p in pids)
  g.close()
  _assert_no_workers_left(pids, before)
  np.testing.assert_array_equal(g.grade_batch([summary("\\sqrt{9}")], ["3"]), [1.0])
  pids = g.worker_pids()
  g.close()
  _assert_no_workers_left(pids, before)


# ----------------------------------------------------------------------------------------------
# Exact-path answers and machine load (issue #16).

# Decided by the exact path: numbers as exact rationals, identical LaTeX, missing answers.
EXACT_CASES = [
    (summary("72"), "#### 72", 1.0), (summary("72.00"), "#### 72", 1.0),
    (summary("\\$1,234"), "#### 1,234", 1.0), (summary("\\frac{6}{4}"), "\\frac{3}{2}", 1.0),
    (summary("8.7 \\times 10^{8}"), "870000000", 1.0), (summary("x^2+1"), "x^2 + 1", 1.0),
    (summary("71"), "#### 72", 0.0), (summary("0.333"), "\\frac{1}{3}", 0.0),
    (PREFIX + "72", "#### 72", 0.0),
]


def test_exact_path_never_depends_on_the_pool_or_its_timeout(caplog):
  # Every worker hangs on every answer and the hard deadline is 1 us: whatever reaches the pool
  # times out, deterministically. The exact path must still grade, and be the only thing that does.
  before = _descendants()
  responses = [r for r, _, _ in EXACT_CASES]
  references = [ref for _, ref, _ in EXACT_CASES]
  expected = [e for _, _, e in EXACT_CASES]
  with grading.Grader(num_workers=1, timeout_s=1e-6, answer_hook=hang_hook) as g:
    np.testing.assert_array_equal(g.grade_batch(responses, references), expected)
    assert g.worker_pids() == [] and g.stats["pool"] == 0  # No worker even started.
    # Mixed with symbolic answers that saturate the pool: "\\sqrt{8}" is right, but unchecked.
    symbolic = [summary("\\sqrt{8}"), summary("\\frac{\\pi}{2}")]
    scores = g.score_batch([THINKING] * (len(symbolic) + len(responses)), symbolic + responses,
                           ["2\\sqrt{2}", "\\pi/2"] + references)
    np.testing.assert_array_equal(scores, [0.0, 0.0] + expected)
    assert g.stats["in_process"] == 2 * len(EXACT_CASES)
    assert g.stats["pool"] == 2 and g.stats["timeouts"] == 2
    pids = g.worker_pids()
  assert "2 of 2 symbolic answers scored 0 unchecked" in caplog.text
  _assert_no_workers_left(pids, before)
  # The in-process functions take no deadline on the exact path either.
  for (response, reference, e) in EXACT_CASES:
    assert grading.grade(response, reference, timeout_s=1e-6) == e
    assert grading.score(THINKING, response, reference, timeout_s=1e-6) == e


def test_import_paths_are_one_api():
  import brpo.rewards
  for name in grading.__all__:
    assert getattr(brpo.rewards, name) is getattr(grading, name)
  assert brpo.rewards.grade(summary("72"), "#### 72") == 1.0


def test_module_level_batch_functions_clean_up():
  before = _descendants()
  scores = grading.grade_batch([summary("\\frac{2}{4}"), summary("72"), None],
                               ["\\frac12", "#### 72", "1"], num_workers=1)
  np.testing.assert_array_equal(scores, [1, 1, 0])
  scores = grading.score_batch([THINKING] * 2, [summary("\\sqrt{4}")] * 2, ["2", "2"],
                               [False, True], num_workers=1)
  np.testing.assert_array_equal(scores, [1, 0])
  assert _descendants() - before == set()


def test_spawn_start_method_works():
  before = _descendants()
  with grading.Grader(num_workers=1, start_method="spawn") as g:
    np.testing.assert_array_equal(
        g.grade_batch([summary("\\sqrt{8}"), summary("\\sqrt{7}")], ["2\\sqrt{2}"] * 2), [1, 0])
    pids = g.worker_pids()
  _assert_no_workers_left(pids, before)
  with pytest.raises(ValueError, match="start_method"):
    grading.Grader(start_method="fork")


def _divide_setup(numerator: float):
  return lambda d: numerator / d


def test_pool_reports_handler_errors_and_keeps_its_worker():
  before = _descendants()
  counts = collections.Counter()
  p = pool.KillablePool(1, 60.0, _divide_setup, (6,), memory_bytes=None, stats=counts)
  try:
    assert p.run([2, 0, 3]) == [("ok", 3.0), ("error", "ZeroDivisionError: division by zero"),
                                ("ok", 2.0)]
    assert p.run([]) == []
    assert counts["workers_started"] == 1 and not counts["crashes"]
    pids = p.pids()
  finally:
    p.close()
  _assert_no_workers_left(pids, before)


def _unimportable_hook(answer: str) -> None:
  del answer


def test_workers_that_cannot_start_raise_instead_of_looping():
  # A hook from a module the workers cannot import: every worker dies before it is ready.
  ghost = types.ModuleType("brpo_ghost_hooks")
  hook = types.FunctionType(_unimportable_hook.__code__, {}, "hook")
  hook.__module__, hook.__qualname__ = ghost.__name__, "hook"
  ghost.hook = hook
  sys.modules[ghost.__name__] = ghost
  before = _descendants()
  try:
    with grading.Grader(num_workers=2, answer_hook=hook) as g:
      with pytest.raises(RuntimeError, match="died before they were ready"):
        g.grade_batch([summary("\\sqrt{4}")], ["2"])
  finally:
    del sys.modules[ghost.__name__]
  assert _descendants() - before == set()


# ----------------------------------------------------------------------------------------------
# Fuzzing (issue "Reliability" item 3): hostile text through the batched grader.

_TOKENS = [
    "\\boxed{", "\\boxed {", "\\fbox{", "{", "}", "\\{", "\\}", "\\\\", "\\", "$", "\\frac{",
    "^{", "_{", "\\sqrt{", "\\left(", "\\right)", "(", ")", "[", "]", "\\infty", "</think>",
    "<think>", "\n\n", "\n", " \n \n", grading.FINAL_ANSWER_MARKER, "9^{9^{9^{9}}}",
    "10^{10^{10}}", "(10^{100})!", "\\binom{10^{9}}{10^{8}}", "0.333", "\\frac13", "72", "-0",
    "1e999999", "\\text{", "\\begin{pmatrix}", "\\end{pmatrix}", "&", "\\pi", "i", "x", "=",
    "\\in", "\\cup", "\\%", "#### ", "\x00", "\ud800", "\u202e", "é", "∑", "😀",
]
_PIECE = st.one_of(
    st.sampled_from(_TOKENS),
    st.text(max_size=20),
    st.integers(1, 3000).map(lambda d: "{" * d + "1" + "}" * d),  # Deep, balanced.
    st.integers(1, 3000).map(lambda d: "{" * d),  # Deep, unbalanced.
    st.integers(2, 9).map(lambda k: "9^{" * k + "9" + "}" * k),  # Power towers.
    st.integers(0, 6000).map(lambda n: "9" * n),  # Long integers (past int's 4300 digits).
)
_BODY = st.lists(_PIECE, max_size=6).map("".join)
_FUZZ_REFERENCES = ["#### 72", "9", "\\frac{1}{2}", ["1", "\\{1\\}"], 142.0, "x^2+1",
                    "(-\\infty, 0]"]


def _responses(body: str, piece: str, megabyte: bool) -> list[str]:
  """Four responses from one drawn body: hypothesis' cost is per draw, so each draw is reused."""
  if megabyte:  # A megabyte of one piece.
    long = PREFIX + (piece or "x") * ((1 << 20) // max(1, len(piece)) + 1)
  else:
    long = PREFIX + "\\boxed{" + piece + "}" + body
  return [body, PREFIX + body, PREFIX + "\\boxed{" + body + "}", long]


_ITEM = st.tuples(
    # About 1 in 100 gets a megabyte (hypothesis favours the ends of a range, so not 0 or 99).
    st.builds(_responses, _BODY, st.sampled_from(_TOKENS),
              st.integers(0, 99).map(lambda k: k == 50)),
    # Mostly one `</think>` (so the gate passes and answers reach the grader), sometimes 0 or many.
    st.sampled_from([1] * 6 + [0, 2, 5000]).map(lambda k: "reasoning" + "</think>" * k),
    st.integers(0, len(_FUZZ_REFERENCES) - 1),
    st.integers(0, 9).map(lambda i: i == 0),  # Ended with end-of-sequence.
)
_FUZZ_ITEMS = 50  # x 4 responses per batch.
_FUZZ_BATCHES = 50


def test_fuzz_batched_grader_never_raises_hangs_or_leaks():
  before = _descendants()
  graded = []
  with grading.Grader(num_workers=2, timeout_s=0.25) as g:

    @hypothesis.settings(max_examples=_FUZZ_BATCHES, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(_ITEM, min_size=_FUZZ_ITEMS, max_size=_FUZZ_ITEMS))
    def check(items):
      responses, thinkings, references, eos = [], [], [], []
      for variants, thinking, reference, ended in items:
        for response in variants:
          responses.append(response)
          thinkings.append(thinking)
          references.append(_FUZZ_REFERENCES[reference])
          eos.append(ended)
      # Half the batches without the gate, so that every response reaches extraction.
      gated = len(graded) % 2 == 1
      if gated:
        scores = g.score_batch(thinkings, responses, references, eos)
      else:
        scores = g.grade_batch(responses, references)
      assert scores.shape == (len(responses),) and scores.dtype == np.float32
      assert set(np.unique(scores)) <= {0.0, 1.0}
      for score, thinking, response, ended in zip(scores, thinkings, responses, eos):
        if gated and (ended or (thinking + response).count("</think>") != 1):
          assert score == 0.0
        if grading.extract_answer(response) is None:
          assert score == 0.0
      graded.append(len(scores))

    check()
    pids = g.worker_pids()
  assert sum(graded) >= 10_000
  assert g.stats["pool"] > 0  # Some answers did reach the workers.
  _assert_no_workers_left(pids, before)
