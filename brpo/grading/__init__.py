"""Rewards for summaries (SPEC §4): extract the final boxed answer, check the format, grade it.

Modules, by concern:
  extract: answer extraction, the format gate (exactly one `</think>`), reference answers.
  exact:   the exact path (exact rationals, identical LaTeX), always in the calling process.
  verify:  the symbolic path (math-verify) with a soft deadline.
  pool:    a small pool of killable worker processes with a hard per-task deadline.
  grader:  `grade`/`score` for one answer, `Grader` for batches (symbolic answers in the pool).
"""

from brpo.grading.exact import MAX_NESTING, exact_number
from brpo.grading.extract import (FINAL_ANSWER_MARKER, MAX_ANSWER_CHARS, SUMMARY_PREFIX, THINK_END,
                                  extract_answer, format_ok, reference_answer, reference_answers)
from brpo.grading.grader import Grader, grade, grade_batch, score, score_batch
from brpo.grading.pool import DEFAULT_WORKER_MEMORY_BYTES
from brpo.grading.verify import DEFAULT_TIMEOUT_S

__all__ = [
    "DEFAULT_TIMEOUT_S", "DEFAULT_WORKER_MEMORY_BYTES", "FINAL_ANSWER_MARKER", "MAX_ANSWER_CHARS",
    "MAX_NESTING", "SUMMARY_PREFIX", "THINK_END", "Grader", "exact_number", "extract_answer",
    "format_ok", "grade", "grade_batch", "reference_answer", "reference_answers", "score",
    "score_batch",
]
