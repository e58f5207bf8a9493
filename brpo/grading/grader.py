"""Rewards of summaries: the single-answer functions and the batched `Grader`.

Per answer: the format gate and extraction (`extract`), then the exact path (`exact`) in the
calling process with no timeout, and only for what that leaves undecided the symbolic path
(`verify`), in killable workers (`pool`) for a `Grader`. So an answer the exact path decides (all
of GSM8K) gets the same reward on any machine under any load (issue #16); a symbolic check that
outlives its deadline scores 0, is counted in `Grader.stats` and is logged.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from brpo.grading import exact, extract, pool, verify

_log = logging.getLogger("brpo.grading")


def grade(response: str, reference: Any, timeout_s: float = verify.DEFAULT_TIMEOUT_S) -> float:
  """1.0 if the response's boxed final answer equals the reference, else 0.0.

  Never raises for any response (a bad reference raises ValueError, see `reference_answers`).
  Runs in this process. Exact numbers are safe; a symbolic answer gets a SIGALRM deadline of
  `timeout_s` when called from the main thread, which stops Python-level work but not one long
  C-level big-integer operation (the first symbolic answer also warms the parser up, ~2 s).
  For model output at scale use `Grader`, whose workers are killed.
  """
  golds = extract.reference_answers(reference)
  answer = extract.extract_answer(response)
  verdict, undecided = exact.fast_verdict(answer, golds)
  if verdict is not None:
    return verdict
  verify.warm_up()  # Once per process, outside the deadline: a cold parser is 10x slower at first.
  return verify.judge(answer, undecided, timeout_s)[0]


def score(thinking_text: str, response: str, reference: Any,
          thinking_ended_with_eos: bool = False,
          timeout_s: float = verify.DEFAULT_TIMEOUT_S) -> float:
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
  if not extract.gate(thinking_text, response, thinking_ended_with_eos):
    return 0.0
  return grade(response, reference, timeout_s)


class Grader:
  """Grades batches of responses; symbolic answers run in a pool of killable worker processes.

  Per response the parent extracts the answer and decides in-process what is exact and cheap
  (missing or over-long answers, exact numbers, identical LaTeX), whatever the batch size and
  with no clock running: that is all of GSM8K and needs no workers. The rest is deduplicated,
  looked up in an LRU cache of earlier verdicts, and sent one answer at a time to the workers. An
  answer whose worker has not replied within `timeout_s`, or whose worker died on it, scores 0;
  the worker is killed (SIGKILL) and replaced. Workers also stop their own work at
  0.8 * `timeout_s` (SIGALRM; the answer scores 0) so that ordinary slow sympy work costs no
  restart. Such answers are counted in `stats`, and a batch that had any logs a warning.

  Workers come from a "forkserver" context by default (the parent may have JAX threads, which a
  plain fork would copy in a broken state); the fork server preloads the symbolic path and
  math-verify once (this sets the process-wide forkserver preload list), so a replacement worker
  starts in milliseconds. "spawn" also works, with a few seconds of imports per new worker. As
  with any non-fork start method, a script that uses a Grader needs the
  `if __name__ == "__main__":` guard; without it workers die at start and `grade_batch` raises
  RuntimeError after a few tries. Workers start on first need (or `start()`); `close()` (or
  leaving the `with` block) kills them all. Not thread-safe: use one Grader per thread.
  """

  def __init__(self, num_workers: int | None = None,
               timeout_s: float = verify.DEFAULT_TIMEOUT_S, *,
               start_method: str = "forkserver",
               worker_memory_bytes: int | None = pool.DEFAULT_WORKER_MEMORY_BYTES,
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
    self.stats: collections.Counter[str] = collections.Counter()
    self._pool = pool.KillablePool(
        max(1, num_workers or min(8, os.cpu_count() or 1)), timeout_s,
        verify.worker_handler, (answer_hook, 0.8 * timeout_s), start_method=start_method,
        preload=[verify.__name__, "math_verify"], memory_bytes=worker_memory_bytes,
        stats=self.stats, name="brpo-grader")
    self.num_workers, self.timeout_s = self._pool.num_workers, self._pool.timeout_s
    self.start_method, self.worker_memory_bytes = start_method, worker_memory_bytes
    self.cache_size, self.answer_hook = cache_size, answer_hook
    self._cache: collections.OrderedDict[tuple[str, tuple[str, ...]], float] = (
        collections.OrderedDict())

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
    self._pool.start()

  def close(self) -> None:
    """Stops and reaps every worker; the Grader may be used again (workers restart)."""
    self._pool.close()

  def worker_pids(self) -> list[int]:
    """Process ids of the current workers (for monitoring and leak checks)."""
    return self._pool.pids()

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
        golds.append(extract.reference_answers(reference))
      except ValueError as e:
        raise ValueError(f"reference {i}: {e}") from None
    scores = np.zeros(n, np.float32)
    waiting: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for i in range(n):
      self.stats["answers"] += 1
      if thinking_texts is not None and not extract.gate(thinking_texts[i], responses[i], eos[i]):
        self.stats["gated"] += 1
        continue
      answer = extract.extract_answer(responses[i])
      verdict, undecided = exact.fast_verdict(answer, golds[i])
      if verdict is not None:  # Decided here with no clock running: load cannot change it.
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
      for key, verdict in self._symbolic(list(waiting)).items():
        scores[waiting[key]] = verdict
        if self.cache_size > 0:
          self._cache[key] = verdict
          if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
    return scores

  def _symbolic(self, keys: list[tuple[str, tuple[str, ...]]]) -> dict[Any, float]:
    """Verdicts of distinct (answer, undecided references) keys from the workers.

    Anything but a finished check scores 0 and is counted: hard timeouts and crashes (by the
    pool), soft timeouts and errors (by the worker). Timeouts and crashes, the outcomes machine
    load can change, are also logged.
    """
    self.stats["pool"] += len(keys)
    started = time.monotonic()
    results = self._pool.run(keys)
    self.stats["pool_ms"] += round(1000 * (time.monotonic() - started))
    verdicts, unfinished = {}, collections.Counter()
    for key, (status, value) in zip(keys, results):
      verdict, how = value if status == "ok" else (0.0, status)
      verdicts[key] = float(verdict)
      if status == "ok" and how != "ok":
        self.stats[f"soft_{how}s"] += 1
      elif status == "error":
        self.stats["errors"] += 1
      if how in ("timeout", "crash"):
        unfinished["soft timeout" if status == "ok" else status] += 1
    if unfinished:
      _log.warning(
          "grading: %d of %d symbolic answers scored 0 unchecked (%s) at timeout_s=%g; so far: "
          "%d timeouts, %d soft timeouts, %d crashes", sum(unfinished.values()), len(keys),
          ", ".join(f"{k}: {v}" for k, v in sorted(unfinished.items())), self.timeout_s,
          self.stats["timeouts"], self.stats["soft_timeouts"], self.stats["crashes"])
    return verdicts


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
