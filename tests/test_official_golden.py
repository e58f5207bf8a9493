"""The project against golden outputs of the paper's own code (issue #14).

tests/fixtures/official/brpo_golden.json holds what sail-sg/AnytimeReasoner (commit in the file)
computed on small scripted rollouts: cuts, rewards, returns, baselines, thinking and summary
advantages, the token-to-segment map. Here the same inputs go through our functions: the cut
rule (`anytime.compute_cuts`), grading of every budget's summaries (`scoring.score_rollout` with
the real grader), `rl_step.compute_advantages` (official layout: summaries resampled per budget),
and the token map used by packing. Tolerance: the official tensors are float32.
"""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from brpo import grading
from brpo.core import advantages as adv_lib
from brpo.core import budgets as budgets_lib
from brpo.core import texts
from brpo.rollout import anytime as at
from brpo.run import rl_step, scoring
from brpo.run.config import RLConfig

with open(os.path.join(os.path.dirname(__file__), "fixtures", "official", "brpo_golden.json")) as f:
  GOLDEN = json.load(f)
CASES = {c["name"]: c for c in GOLDEN["cases"]}
ATOL = 2e-6

# A tokenizer of a few whole texts: enough to drive scoring with the SPEC §4 strings.
PAD, EOS, THINK, THINK_END, ELLIPSIS, MARKER = 0, 2, 3, 5, 6, 7
RIGHT, WRONG, RIGHT_EXTRA_TAG = 11, 12, 13  # summary_code 1, 0, 2
VOCAB = {PAD: "", EOS: "", THINK: "x", THINK_END: texts.THINK_END, ELLIPSIS: texts.ELLIPSIS_TEXT,
         MARKER: texts.ANSWER_MARKER, RIGHT: "\\boxed{42}", WRONG: "\\boxed{7}",
         RIGHT_EXTRA_TAG: "\\boxed{42}" + texts.THINK_END}
CODE_TOKEN = {1: RIGHT, 0: WRONG, 2: RIGHT_EXTRA_TAG}
TOKS = at.AnytimeTokens(eos_id=EOS, pad_id=PAD, think_end_ids=(THINK_END,),
                        insert_running=(ELLIPSIS, THINK_END, MARKER), insert_ended=(MARKER,))
END_KIND = {"budget": at.END_BUDGET, "think_end": at.END_THINK, "eos": at.END_EOS}


class CharTokenizer:

  def decode(self, ids):
    return "".join(VOCAB[int(i)] for i in ids)


def _rollout(case) -> at.AnytimeRollout:
  """The case's scripted thinkings and summaries as an AnytimeRollout of R = N * G rows."""
  i = case["inputs"]
  n, g, m, a = i["N"], i["G"], i["m"], i["A"]
  b_max = i["budgets"][-1]
  lengths = np.array(i["thinking_length"]).reshape(-1)
  ends = np.array([END_KIND[e] for row in i["thinking_end"] for e in row])
  thinking = np.full((n * g, b_max), PAD, np.int32)
  for r, (length, end) in enumerate(zip(lengths, ends)):
    thinking[r, :length] = THINK
    if end != at.END_BUDGET:
      thinking[r, length - 1] = THINK_END if end == at.END_THINK else EOS
  cuts = at.compute_cuts(jnp.asarray(lengths), jnp.asarray(ends), i["budgets"], TOKS)
  codes = np.array(i["summary_code"]).reshape(n * g, m, a)
  summary = np.vectorize(CODE_TOKEN.get)(codes)[..., None].astype(np.int32)  # S = 1
  return at.AnytimeRollout(
      prompt=jnp.zeros((n * g, 1), jnp.int32), prompt_valid=jnp.ones((n * g, 1), bool),
      thinking=jnp.asarray(thinking), thinking_logp=jnp.zeros((n * g, b_max)),
      thinking_len=jnp.asarray(lengths, jnp.int32), thinking_end=jnp.asarray(ends, jnp.int32),
      cuts=cuts, summary=jnp.asarray(summary), summary_logp=jnp.zeros(summary.shape),
      summary_len=jnp.ones((n * g, m, a), jnp.int32),
      budgets=jnp.asarray(i["budgets"], jnp.int32), reused=False)


def _rl(i) -> RLConfig:
  return RLConfig(budgets=tuple(i["budgets"]), prior_weights=tuple(i["probs"]),
                  n_summaries=i["A"], group_size=i["G"], thinking_baseline=i["variance_reduction"],
                  summary_advantage="decoupled" if i["summary_method"] == "brpo" else "grpo",
                  lam=i["lam"], prompts_per_batch=i["N"], mini_batch_prompts=i["N"])


@pytest.fixture(scope="module")
def grader():
  with grading.Grader(num_workers=1) as g:
    yield g


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuts_match_the_official_rollout(name):
  case = CASES[name]
  i, o = case["inputs"], case["outputs"]
  shape = (i["N"], i["G"], i["m"])
  cuts = _rollout(case).cuts
  np.testing.assert_array_equal(np.asarray(cuts.length).reshape(shape), o["cut_length"])
  np.testing.assert_array_equal(np.asarray(cuts.canonical).reshape(shape), o["canonical"])
  # The official "truncated or no </think>": every cut that gets the running insert.
  running = np.asarray(cuts.insert_len).reshape(shape) == len(TOKS.insert_running)
  np.testing.assert_array_equal(running, o["cut_truncated"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_rewards_and_advantages_match_the_official_code(name, grader):
  case = CASES[name]
  i, o = case["inputs"], case["outputs"]
  n, g, m, a = i["N"], i["G"], i["m"], i["A"]
  ro = _rollout(case)
  refs = ["42"] * (n * g)
  rewards = scoring.score_rollout(ro, CharTokenizer(), TOKS, refs, grader)
  np.testing.assert_array_equal(rewards.reshape(n, g, m, a), o["summary_rewards"])
  rewards = np.asarray(o["summary_rewards"], np.float64)
  cut_rewards = rewards.mean(-1)
  np.testing.assert_allclose(cut_rewards, o["cut_rewards"], atol=ATOL)
  probs = np.asarray(i["probs"])
  returns, baseline = adv_lib.returns_and_baselines(cut_rewards, probs, i["variance_reduction"],
                                                    i["lam"])
  np.testing.assert_allclose(returns, o["returns"], atol=ATOL)
  np.testing.assert_allclose(baseline, o["baseline"], atol=ATOL)
  canonical = np.asarray(ro.cuts.canonical)
  # Every case's config is accepted, a group of one (uniform_A2_G1: V2 = 0) included.
  think, summ, train = rl_step.compute_advantages(rewards, _rl(i), canonical, reused=False)
  np.testing.assert_allclose(think.reshape(n, g, m), o["thinking_adv"], atol=ATOL)
  np.testing.assert_allclose(summ.reshape(n, g, m, a), o["summary_adv"], atol=ATOL)
  if i["summary_method"] == "brpo":  # every budget's own summaries are trained
    assert train.all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_token_map_matches_the_official_code(name):
  """Thinking tokens of segment s (t in (b_{s-1}, b_s]) get A_s, as packing assigns them."""
  case = CASES[name]
  i, o = case["inputs"], case["outputs"]
  think = np.asarray(o["thinking_adv"]).reshape(i["N"] * i["G"], i["m"])
  b_max = i["budgets"][-1]
  seg = budgets_lib.segment_of_tokens(jnp.asarray(i["budgets"]), b_max)
  lengths = np.array(i["thinking_length"]).reshape(-1)
  mask = np.arange(b_max)[None] < lengths[:, None]
  got = adv_lib.token_advantages(jnp.asarray(think, jnp.float32),
                                 jnp.broadcast_to(seg, mask.shape), jnp.asarray(mask))
  want_seg = [s for row in o["thinking_token_segment"] for s in row]
  want_adv = [s for row in o["thinking_token_adv"] for s in row]
  np.testing.assert_array_equal([np.asarray(seg)[:length] for length in lengths][0],
                                want_seg[0][:lengths[0]])
  for r, length in enumerate(lengths):
    np.testing.assert_array_equal(np.asarray(seg)[:length], want_seg[r])
    np.testing.assert_allclose(np.asarray(got)[r, :length], want_adv[r], atol=ATOL)


def test_the_golden_file_names_its_source():
  src = GOLDEN["source"]
  assert src["repository"].endswith("sail-sg/AnytimeReasoner") and len(src["commit"]) == 40
  assert dataclasses.is_dataclass(RLConfig)
