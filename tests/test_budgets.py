"""Tests for brpo.budgets: budget supports, priors (SPEC §2) and the token-to-segment map.

Every invalid input must raise a one-line ValueError that names the problem.
"""

import numpy as np
import pytest

from brpo.core import budgets as B


def test_support_from_b_max_and_m():
  # SPEC §2: the reference builds b_j = (b_max / m) * j.
  spec = B.make_budgets(b_max=8000, m=4)
  assert spec.budgets == (2000, 4000, 6000, 8000)
  assert spec.m == 4
  assert spec.b_max == 8000
  assert all(type(b) is int for b in spec.budgets)


def test_explicit_support_is_kept():
  spec = B.make_budgets(budgets=[3, 5, 11])
  assert spec.budgets == (3, 5, 11)
  assert spec.b_max == 11


def test_uniform_prior():
  spec = B.make_budgets(b_max=8000, m=4, prior="uniform")
  assert spec.probs == (0.25, 0.25, 0.25, 0.25)
  # With no prior and no weights the prior is uniform.
  assert B.make_budgets(b_max=8000, m=4).probs == (0.25, 0.25, 0.25, 0.25)


def test_linear_prior_matches_spec_claim():
  # SPEC §2: "linear: P_j proportional to b_j (m = 4 gives 0.1, 0.2, 0.3, 0.4)".
  # b = (2000, 4000, 6000, 8000) sums to 20000, so P_j = 2000 j / 20000 = j / 10. The division of
  # two exact integers is correctly rounded, so the doubles equal the literals exactly.
  spec = B.make_budgets(b_max=8000, m=4, prior="linear")
  assert spec.probs == (0.1, 0.2, 0.3, 0.4)
  # Proportional to b_j, not to j: (1, 2, 5) sums to 8.
  assert B.make_budgets(budgets=(1, 2, 5), prior="linear").probs == (0.125, 0.25, 0.625)


def test_base_prior():
  assert B.make_budgets(b_max=8000, m=4, prior="base").probs == (0.0, 0.0, 0.0, 1.0)
  assert B.make_budgets(b_max=8000, m=1, prior="base").probs == (1.0,)


def test_explicit_weights():
  spec = B.make_budgets(budgets=(10, 20, 30), weights=(0.5, 0.0, 0.5))
  assert spec.probs == (0.5, 0.0, 0.5)
  # A sum off by less than the 1e-6 tolerance is accepted.
  B.make_budgets(budgets=(10, 20), weights=(0.5, 0.5 + 5e-7))


def test_direct_construction_is_validated():
  assert B.BudgetSpec((2, 4), (0.5, 0.5)).budgets == (2, 4)
  with pytest.raises(ValueError, match="strictly increasing"):
    B.BudgetSpec((4, 2), (0.5, 0.5))
  with pytest.raises(ValueError, match="sum"):
    B.BudgetSpec((2, 4), (0.5, 0.6))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(budgets=(2, 2, 4)), "strictly increasing"),
        (dict(budgets=(4, 2)), "strictly increasing"),
        (dict(budgets=(0, 2)), "positive"),
        (dict(budgets=(-2, 2)), "positive"),
        (dict(budgets=(2, 4.5)), "integer"),
        (dict(budgets=()), "empty"),
        (dict(), "budgets or b_max"),
        (dict(b_max=8000), "budgets or b_max"),
        (dict(budgets=(2, 4), b_max=4, m=2), "not both"),
        (dict(b_max=10, m=4), "multiple"),
        (dict(b_max=8000, m=0), "m="),
        (dict(b_max=0, m=1), "positive"),
        (dict(b_max=8000, m=4, prior="cubic"), "prior"),
        (dict(b_max=8000, m=4, weights=(0.5, 0.5)), "length"),
        (dict(b_max=8000, m=2, weights=(1.5, -0.5)), "negative"),
        (dict(b_max=8000, m=2, weights=(0.5, 0.4)), "sum"),
        (dict(b_max=8000, m=2, weights=(0.5, 0.5 + 2e-6)), "sum"),
        (dict(b_max=8000, m=2, prior="linear", weights=(0.5, 0.5)), "not both"),
    ],
)
def test_invalid_inputs_raise_one_line_value_error(kwargs, words):
  with pytest.raises(ValueError, match=words) as info:
    B.make_budgets(**kwargs)
  assert "\n" not in str(info.value)


def test_segment_of_tokens_hand_worked():
  # Tokens t in (b_{s-1}, b_s] form segment s (0-based here): with b = (2, 4, 6, 8) tokens 1, 2
  # are segment 0, tokens 3, 4 segment 1, and so on.
  np.testing.assert_array_equal(B.segment_of_tokens((2, 4, 6, 8), 8), [0, 0, 1, 1, 2, 2, 3, 3])
  # A thinking shorter than b_max only gets the segments it reaches.
  np.testing.assert_array_equal(B.segment_of_tokens((3, 5), 4), [0, 0, 0, 1])
  spec = B.make_budgets(budgets=(3, 5))
  out = B.segment_of_tokens(spec, 5)
  np.testing.assert_array_equal(out, [0, 0, 0, 1, 1])
  assert out.dtype == np.int32
  assert B.segment_of_tokens(spec, 0).shape == (0,)


def test_segment_of_tokens_matches_loop_definition():
  rng = np.random.default_rng(0)
  for _ in range(5):
    m = int(rng.integers(1, 6))
    support = tuple(int(b) for b in np.sort(rng.choice(np.arange(1, 40), m, replace=False)))
    length = int(rng.integers(0, support[-1] + 1))
    want = [min(s for s in range(m) if support[s] >= t) for t in range(1, length + 1)]
    np.testing.assert_array_equal(B.segment_of_tokens(support, length), want)


def test_segment_of_tokens_rejects_tokens_past_b_max():
  with pytest.raises(ValueError, match="b_max"):
    B.segment_of_tokens((2, 4), 5)
  with pytest.raises(ValueError, match="length"):
    B.segment_of_tokens((2, 4), -1)


def test_spec_texts_agree_with_the_tokenizer_names():
  from brpo.core import texts
  from models import tokenizer

  assert (texts.THINK_START, texts.THINK_END) == (tokenizer.THINK_START, tokenizer.THINK_END)
  assert texts.CUT_TEXT + texts.ANSWER_MARKER == "...\n\n...\n\n</think>\n\n**Final Answer**\n"
