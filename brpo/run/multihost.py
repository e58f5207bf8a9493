"""Prompts across processes: every process pads only the prompt rows its devices hold and the
rows become one global array (the row helpers themselves are `brpo.rows`).
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh

from brpo import rows as rows_lib
from brpo.rollout import sampling


def prompt_bucket(prompts: Sequence[Sequence[int]], cap: int | None = None) -> int:
  """The padded prompt length of one batch: the next power of two (at least 8) of its longest
  prompt, at most `cap` (the data set's `_prompt_length`). A batch of ~80-token MATH prompts is
  padded to 128, not to the longest prompt of the data set, and the powers of two keep the
  number of compiled shapes to a few (8, 16, ..., cap)."""
  n = max(len(p) for p in prompts)
  p = 8
  while p < n:
    p *= 2
  return p if cap is None else max(min(p, cap), n)


def prompt_rows(prompts, group_size: int, pad_id: int, prompt_length: int | None = None,
                mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
  """N prompts, each repeated G times and left-padded: (tokens, valid) [N * G, P].

  With a `mesh`, the rows are split over its batch axes (`row_sharding`) and every process pads
  only the rows it holds (the same `prompts` on every process); the results are global arrays.
  """
  rows = [list(p) for p in prompts for _ in range(group_size)]
  if mesh is None:
    return sampling.pad_prompts(rows, pad_id, prompt_length)
  # Every process must pad to the same length: it comes from all rows, not this one's share.
  length = prompt_length or sampling.bucket_length(max(len(p) for p in rows))
  where = rows_lib.row_sharding(mesh, len(rows), 2)
  mine = sampling.pad_prompts(rows[rows_lib.process_rows(where, len(rows))], pad_id, length)
  tokens, valid = (rows_lib.put_rows(x, where, len(rows)) for x in mine)
  return tokens, valid
