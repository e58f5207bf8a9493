"""Grading an anytime rollout: the text of every distinct cut, graded by a `brpo.grading`
Grader, as summary rewards [R, m, A] (SPEC §4). Each process grades the rows it holds.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from brpo.rollout import anytime as at
from brpo import rows as rows_lib
from models.tokenizer import Tokenizer


def rollout_texts(ro: at.AnytimeRollout, tokenizer: Tokenizer, toks: at.AnytimeTokens):
  """Texts to grade: [(r, j, a, thinking_text, response, eos_cut)] for every budget's own
  summaries (for every distinct cut when the rollout reused summaries at shared cuts).

  thinking_text is the thinking up to the cut plus any inserted text up to `</think>`;
  response is "\\n\\n**Final Answer**\\n" plus the generated summary (without eos); eos_cut
  marks the cut that holds the end-of-sequence ending the thinking (it scores 0; earlier cuts of
  that thinking are graded as usual, as in the official code).
  Only the rows this process holds (rows_lib.local_rows; all of them with one process); r
  counts from the first of them.
  """
  h = {k: rows_lib.local_rows(x) for k, x in (
      ("think", ro.thinking), ("end", ro.thinking_end), ("len", ro.cuts.length),
      ("canon", ro.cuts.canonical), ("ended", ro.cuts.ended), ("eos", ro.cuts.eos),
      ("summ", ro.summary),
      ("slen", ro.summary_len))}
  r_, m, a_, _ = h["summ"].shape
  marker = at.ANSWER_MARKER
  head_running = tokenizer.decode(toks.insert_running[:len(toks.insert_running)
                                                      - len(toks.insert_ended)])
  out = []
  for r in range(r_):
    for j in range(m):
      if ro.reused and h["canon"][r, j] != j:
        continue
      eos_cut = bool(h["eos"][r, j])
      think = tokenizer.decode(h["think"][r, :h["len"][r, j]])
      if not h["ended"][r, j] or eos_cut:
        think += head_running
      for a in range(a_):
        ids = h["summ"][r, j, a, :h["slen"][r, j, a]]
        if len(ids) and ids[-1] == toks.eos_id:
          ids = ids[:-1]
        out.append((r, j, a, think, marker + tokenizer.decode(ids), eos_cut))
  return out


def score_rollout(ro: at.AnytimeRollout, tokenizer: Tokenizer, toks: at.AnytimeTokens,
                  references: Sequence[Any], grader) -> np.ndarray:
  """Summary rewards [R, m, A] in {0, 1} (SPEC §4); references: [R], one per row.

  Every budget's summaries are graded (with reused summaries, each distinct cut once and budgets
  that share a cut get its rewards). Each process grades the rows it holds, and every process
  gets all the rewards.
  """
  return score_texts(ro, rollout_texts(ro, tokenizer, toks), references, grader)


def score_texts(ro: at.AnytimeRollout, texts, references: Sequence[Any], grader) -> np.ndarray:
  """`score_rollout` from texts already made by `rollout_texts(ro, ...)` (a caller that also
  shows some of them decodes once)."""
  refs = list(references)[rows_lib.local_slice(ro.summary_len)]
  scores = grader.score_batch([t[3] for t in texts], [t[4] for t in texts],
                              [refs[t[0]] for t in texts], [t[5] for t in texts])
  canon = rows_lib.local_rows(ro.cuts.canonical)
  r_, m = canon.shape
  rewards = np.zeros((r_, m, ro.summary_len.shape[2]), np.float32)
  for (r, j, a, *_), s in zip(texts, scores):
    rewards[r, j, a] = s
  if ro.reused:
    rewards = np.take_along_axis(rewards, canon[:, :, None], axis=1)
  return rows_lib.gather_rows(rewards, ro.summary_len)
