"""Budget supports b_1 < ... < b_m and priors P_j over them (SPEC §2).

Also maps each thinking token to its segment: tokens in (b_{s-1}, b_s] form segment s.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PRIORS = ("uniform", "linear", "base")
PROB_TOLERANCE = 1e-6  # How far the weights may sum from 1.


def _as_budget(b) -> int:
  # Floats such as 2000.0 (from b_max / m arithmetic) are fine; 2000.5 is a mistake.
  if isinstance(b, bool) or not isinstance(b, numbers.Real):
    raise ValueError(f"budget {b!r} is not an integer")
  if isinstance(b, numbers.Integral):
    return int(b)
  if not (math.isfinite(b) and float(b).is_integer()):
    raise ValueError(f"budget {b!r} is not an integer")
  return int(b)


def _check_support(budgets: tuple[int, ...]) -> None:
  if not budgets:
    raise ValueError("budget support is empty: give at least one budget")
  if budgets[0] <= 0:
    raise ValueError(f"budgets {budgets} must be positive")
  if any(b <= a for a, b in zip(budgets, budgets[1:])):
    raise ValueError(f"budgets {budgets} are not strictly increasing")


def _check_probs(probs: tuple[float, ...], m: int) -> None:
  if len(probs) != m:
    raise ValueError(f"prior weights {probs} have length {len(probs)}, expected m={m}")
  if any(not math.isfinite(p) for p in probs):
    raise ValueError(f"prior weights {probs} are not finite")
  if any(p < 0 for p in probs):
    raise ValueError(f"prior weights {probs} have a negative entry")
  total = math.fsum(probs)
  if abs(total - 1.0) > PROB_TOLERANCE:
    raise ValueError(f"prior weights {probs} sum to {total!r}, not 1 (tolerance 1e-6)")


@dataclasses.dataclass(frozen=True)
class BudgetSpec:
  """A budget support and the prior over it.

  Attributes:
    budgets: b_1 < ... < b_m, positive integers (thinking tokens); b_m is b_max.
    probs: P_1, ..., P_m, non-negative, summing to 1; the weight of each budget in the anytime
      objective and the dense return (SPEC §3, §5).
  """

  budgets: tuple[int, ...]
  probs: tuple[float, ...]

  def __post_init__(self):
    # Lists and numpy arrays are accepted but stored as tuples so the spec stays hashable.
    budgets = tuple(_as_budget(b) for b in self.budgets)
    probs = tuple(float(p) for p in self.probs)
    _check_support(budgets)
    _check_probs(probs, len(budgets))
    object.__setattr__(self, "budgets", budgets)
    object.__setattr__(self, "probs", probs)

  @property
  def m(self) -> int:
    return len(self.budgets)

  @property
  def b_max(self) -> int:
    return self.budgets[-1]


def make_budgets(budgets: Sequence[int] | None = None, b_max: int | None = None,
                 m: int | None = None, prior: str | None = None,
                 weights: Sequence[float] | None = None) -> BudgetSpec:
  """Builds a BudgetSpec from an explicit support or from (b_max, m).

  Args:
    budgets: an explicit support b_1 < ... < b_m. Give either this or both b_max and m.
    b_max: the largest budget; with m gives b_j = (b_max / m) * j, which must be integers.
    m: the number of budgets.
    prior: "uniform" (P_j = 1/m), "linear" (P_j proportional to b_j) or "base" (0, ..., 0, 1).
      None means uniform, or the explicit weights when they are given.
    weights: explicit P_1..P_m (non-negative, summing to 1 within 1e-6); not with `prior`.

  Returns:
    The validated spec.

  Raises:
    ValueError: with a one-line message naming what is wrong.
  """
  if budgets is not None:
    if b_max is not None or m is not None:
      raise ValueError("give budgets or (b_max, m), not both")
    support = tuple(_as_budget(b) for b in budgets)
  else:
    if b_max is None or m is None:
      raise ValueError("give budgets or b_max and m")
    b_max, m = _as_budget(b_max), int(m)
    if m < 1:
      raise ValueError(f"m={m}: need at least one budget")
    if b_max <= 0:
      raise ValueError(f"b_max={b_max} must be positive")
    if b_max % m:
      raise ValueError(f"b_max={b_max} is not a multiple of m={m}: budgets would not be integers")
    support = tuple(b_max // m * j for j in range(1, m + 1))
  _check_support(support)
  n = len(support)

  if weights is not None:
    if prior is not None:
      raise ValueError(f"give prior={prior!r} or weights, not both")
    probs = tuple(float(w) for w in weights)
  elif prior is None or prior == "uniform":
    probs = (1.0 / n,) * n
  elif prior == "linear":
    # Exact integer total, one correctly rounded division per entry: m = 4 gives 0.1, ..., 0.4.
    total = sum(support)
    probs = tuple(b / total for b in support)
  elif prior == "base":
    probs = (0.0,) * (n - 1) + (1.0,)
  else:
    raise ValueError(f"prior={prior!r}: expected one of {PRIORS} or explicit weights")
  return BudgetSpec(support, probs)


def segment_of_tokens(budgets: BudgetSpec | Sequence[int], length: int) -> np.ndarray:
  """The segment (0-based) of each thinking token t = 1..length.

  Segment s holds the tokens in (b_{s-1}, b_s], so token t belongs to the first budget with
  b_s >= t.

  Args:
    budgets: a BudgetSpec, the support b_1 < ... < b_m, or a JAX array [m] of it (inside jit:
      the training rows carry the support as an array).
    length: the number of thinking tokens, 0 <= length <= b_m (static).

  Returns:
    int32 [length]: numpy, or JAX for a JAX `budgets`.
  """
  if length < 0:
    raise ValueError(f"length={length} is negative")
  if isinstance(budgets, jax.Array):  # Values may be traced: the caller checked the support.
    t = jnp.arange(1, length + 1)
    return jnp.searchsorted(budgets, t, side="left").astype(jnp.int32)
  support = budgets.budgets if isinstance(budgets, BudgetSpec) else tuple(budgets)
  if length > support[-1]:
    raise ValueError(f"length={length} exceeds b_max={support[-1]}: such tokens have no segment")
  t = np.arange(1, length + 1)
  return np.searchsorted(np.asarray(support), t, side="left").astype(np.int32)
