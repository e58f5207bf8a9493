"""The question/answer record that every loader returns (`brpo.tasks.data` re-exports it).

A leaf module: the loaders (`brpo.tasks.data`) and the tasks they dispatch to
(`brpo.tasks.arith.task`) both build `Example`s, so it lives below both of them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Example:
  """One question with its reference answer.

  `answer` is the reference the grader reads: for GSM8K the whole solution ending "#### N", for
  the paper's sets the final answer. `alternatives` holds further accepted answers (the paper's
  list answers: any one of them counts as correct).
  """

  question: str
  answer: str
  id: str
  alternatives: tuple[str, ...] = ()

  @property
  def answers(self) -> tuple[str, ...]:
    return (self.answer,) + self.alternatives
