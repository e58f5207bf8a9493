"""Tests for brpo.warmstart: batches and loss, the budget evaluation's bookkeeping, a few training
steps, and the save / reuse / mismatch behaviour of the warm-start directory."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brpo.tasks.arith import task as arith
from brpo.tasks.arith import warmstart as ws_lib
from brpo.tasks.data import Example
from models import decoder as dec
from models import tokenizer as tok_lib
from models.config import get_config

TASK = arith.ArithTask(min_terms=2, max_terms=3, digits=1)
# A model small enough that a few steps compile and run in seconds.
SMALL = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return arith.train_tokenizer(str(tmp_path_factory.mktemp("ws_tok") / "t.model"), TASK, seed=0)


@pytest.fixture(scope="module")
def cfg(tok):
  return get_config("tiny", vocab_size=tok.vocab_size, **SMALL)


def _traces(n, seed=0):
  rng = np.random.default_rng(seed)
  return [arith.sample_trace(ex, TASK, rng) for ex in arith.generate(n, seed, TASK)]


def test_make_batch_masks_exactly_the_generated_part(tok):
  traces = _traces(5)
  tokens, mask = ws_lib.make_batch(tok, traces, bucket=16)
  assert tokens.shape == mask.shape and tokens.shape[1] % 16 == 0
  for row, m, trace in zip(tokens, mask, traces):
    ids, prompt_len = arith.encode_trace(tok, trace)
    assert row[:len(ids)].tolist() == ids
    assert (row[len(ids):] == tok.pad_id).all()
    assert m.tolist() == [prompt_len <= j < len(ids) for j in range(len(row))]
  assert tokens.shape[1] - 16 < max(len(arith.encode_trace(tok, t)[0]) for t in traces)


def _full_forward(params, cfg, width):
  """Uncached logits of one row padded on the right to `width` (causal: padding is harmless)."""
  mask = jnp.tril(jnp.ones((1, width, width), bool))
  fn = jax.jit(lambda p, row: dec.forward(p, cfg, row[None], jnp.arange(width)[None], mask)[0])
  return lambda p, seq: np.asarray(fn(p, jnp.asarray(seq + [0] * (width - len(seq)))))


def test_sft_loss_matches_numpy_cross_entropy(tok, cfg):
  params = dec.init_params(cfg, jax.random.PRNGKey(1))
  tokens, mask = ws_lib.make_batch(tok, _traces(3), bucket=8)
  loss = float(jax.jit(ws_lib.sft_loss, static_argnums=1)(params, cfg, tokens, mask))
  forward = _full_forward(params, cfg, tokens.shape[1])
  total, count = 0.0, 0
  for row, m in zip(tokens, mask):
    n = int(np.nonzero(row != tok.pad_id)[0][-1]) + 1
    logits = forward(params, row[:n].tolist())  # The row alone, through the dense-mask path.
    for t in range(1, n):
      if m[t]:
        z = logits[t - 1].astype(np.float64)
        total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[row[t]]
        count += 1
  assert loss == pytest.approx(total / count, rel=1e-4)


def test_generate_greedy_matches_full_forward(tok, cfg):
  params = dec.init_params(cfg, jax.random.PRNGKey(2))
  prompts = [tok.encode("12+3=?\n<think>\n"), tok.encode("5-4+9=?\n<think>\n"), [5, 6]]
  out = ws_lib.generate(params, cfg, prompts, max_new=6, temperature=0.0,
                        rng=jax.random.PRNGKey(0), stop_ids=(), pad_id=tok.pad_id)
  forward = _full_forward(params, cfg, 32)
  for prompt, new in zip(prompts, out):
    seq = list(prompt)
    for _ in range(6):  # Uncached greedy decoding of the row alone.
      seq.append(int(np.argmax(forward(params, seq)[len(seq) - 1])))
    assert new == seq[len(prompt):]


def test_generate_cuts_after_the_first_stop(tok, cfg, monkeypatch):
  fixed = np.array([[7, 8, 9, 4, 5], [4, 1, 1, 1, 1], [6, 6, 6, 6, 6]], np.int32)
  monkeypatch.setattr(ws_lib, "_generate", lambda *a, **k: np.pad(fixed, ((0, 5), (0, 0))))
  out = ws_lib.generate(None, cfg, [[3], [3], [3]], 5, 0.0, jax.random.PRNGKey(0), (4, 2), 1)
  assert out == [[7, 8, 9, 4], [4], [6, 6, 6, 6, 6]]


def test_evaluate_budgets_bookkeeping(tok, cfg, monkeypatch):
  """Scripted thinkings and summaries: checks cuts, inserted texts, sharing and the gates."""
  examples = [Example("1+2=?", "3", "a"), Example("4+4=?", "8", "b"),
              Example("2+2=?", "4", "c"), Example("3+3=?", "6", "d")]
  e = lambda s: tok.encode(s)
  think_end = tok.think_end_ids[0]
  full_a = e("1+2=3\ncheck 1+2=3\n") + [think_end]  # 18 tokens, closes within b = 32.
  thinkings = [full_a,
               e("4+4=8\n" * 6),  # 36 tokens, never closes: cut at every budget.
               e("2+2=4\n") + [tok.eos_id],  # Ended with eos: 0 everywhere.
               e("3+3=6\n") + [think_end]]  # Closes at 7 tokens, before every budget.
  calls = []

  def fake_generate(params, cfg, prompts, max_new, temperature, rng, stop_ids, pad_id, **kw):
    calls.append((prompts, max_new, tuple(stop_ids)))
    if len(calls) == 1:
      return thinkings
    out = []
    for ctx in prompts:
      text = tok.decode(ctx)
      answer = text.split("\n")[0].split("=")[0]
      value = sum(int(t) for t in answer.split("+"))
      right = "<think>\n4+4=8\n4+4=8\n4+4=8\n4+4=8\n4+4=8\n" in text or "4+4" not in text
      # Question "4+4": answer right only when at least five lines were seen.
      out.append(e(arith.answer_text(value if right else value + 1)) + [tok.eos_id])
    return out

  monkeypatch.setattr(ws_lib, "generate", fake_generate)
  result = ws_lib.evaluate_budgets(None, cfg, tok, examples, budgets=(32, 8, 16), temperature=0.0)
  assert result.budgets == (8, 16, 32)
  # a: cut at 8 and 16 (right by the script), closed by 32; b: right once 30 tokens are seen
  # (five lines), i.e. at 32 only; c: eos, 0; d: closed at 7 <= every budget.
  assert result.accuracy == (0.5, 0.5, 0.75)
  assert result.frac_closed == 0.5 and result.frac_eos == 0.25
  assert result.mean_thinking_tokens == np.mean([len(z) for z in thinkings])
  assert calls[0][1:] == (32, (think_end, tok.eos_id))
  contexts = [tuple(c) for c in calls[1][0]]
  assert len(contexts) == len(set(contexts))  # One summary per distinct context.
  prompt = lambda i: e(tok_lib.plain_template(examples[i].question))
  cut, ans = e(arith.CUT_TEXT), e(arith.ANSWER_PREFIX)
  assert tuple(prompt(0) + full_a[:8] + cut + ans) in contexts
  assert tuple(prompt(0) + full_a + ans) in contexts
  assert tuple(prompt(1) + thinkings[1][:32] + cut + ans) in contexts
  assert not any(c[:len(prompt(2))] == tuple(prompt(2)) for c in contexts)
  # a: two cuts + one closed; b: three cuts; d: one shared closed context.
  assert len(contexts) == 7


def test_evaluate_budgets_rejects_two_think_ends(tok, cfg, monkeypatch):
  examples = [Example("3+3=?", "6", "d")]
  think_end = tok.think_end_ids[0]
  replies = iter([[tok.encode("3+3=6\n") + [think_end]],
                  [tok.encode("</think>\\boxed{6}") + [tok.eos_id]]])
  monkeypatch.setattr(ws_lib, "generate", lambda *a, **k: next(replies))
  assert ws_lib.evaluate_budgets(None, cfg, tok, examples, (16,), 0.0).accuracy == (0.0,)


def test_extract_answer():
  assert ws_lib.extract_answer("\n\n**Final Answer**\n\\boxed{72}") == "72"
  assert ws_lib.extract_answer("**Final Answer**\n\\boxed{1} or \\boxed{\\frac{1}{2}}") == \
      "\\frac{1}{2}"
  assert ws_lib.extract_answer("\n\n**Final Answer**\n\\boxed{7") is None
  assert ws_lib.extract_answer("\\boxed{7}") is None


@pytest.mark.parametrize("with_rewards", [True, False])
def test_grade_summary(with_rewards, monkeypatch):
  if not with_rewards:  # The local fallback, as before brpo.rewards existed.
    monkeypatch.setitem(sys.modules, "brpo.rewards", None)
  response = arith.ANSWER_PREFIX + "\\boxed{72}"
  assert ws_lib.grade_summary(response, ["72"])
  assert ws_lib.grade_summary(response, ["3", "72"])
  assert not ws_lib.grade_summary(response, ["73"])
  assert not ws_lib.grade_summary("\\boxed{72}", ["72"])  # No "**Final Answer**" paragraph.


# One length bucket covers every trace of TASK: a single compilation.
WS = ws_lib.WarmStartConfig(task=TASK, steps=30, batch_size=16, learning_rate=1e-2,
                            warmup_steps=5, n_train=500, length_bucket=64)


def test_few_steps_reduce_the_loss(tok, cfg):
  params = dec.init_params(cfg, jax.random.PRNGKey(0))
  before = [np.asarray(p).copy() for p in jax.tree.leaves(params)]
  _, history = ws_lib.train(params, cfg, tok, arith.generate(500, 0, TASK), WS, progress=False,
                            log_every=1)
  assert [s for s, _ in history] == list(range(1, 31))
  first = history[0][1]  # Step 1's loss is that of the initial parameters.
  assert first == pytest.approx(np.log(tok.vocab_size), rel=0.05)
  assert np.mean([l for _, l in history[-5:]]) < 0.6 * first
  # The caller's parameters survive (the step donates only its own copy).
  assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(params)))


def test_warm_start_saves_reuses_and_refuses_other_settings(tmp_path):
  d = str(tmp_path / "ws")
  ws = dataclasses.replace(WS, steps=3, stop_accuracy=0.0)
  cfg, params, tok = ws_lib.warm_start(d, ws, SMALL, progress=False)
  assert cfg.vocab_size == tok.vocab_size and cfg.d_model == 32
  assert sorted(os.listdir(d)) == ["params", "tokenizer.model", "warmstart.json"]
  with open(os.path.join(d, "warmstart.json")) as f:
    doc = json.load(f)
  assert doc["warm_start"]["task"] == dataclasses.asdict(TASK)
  assert doc["model_config"]["n_layers"] == 1
  assert [s for s, _ in doc["results"]["loss_history"]] == [3]

  cfg2, params2, tok2 = ws_lib.warm_start(d, ws, SMALL, progress=False)  # Reused, not retrained.
  assert cfg2 == cfg and tok2.vocab_size == tok.vocab_size
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))

  with pytest.raises(ValueError, match=r"model_config\.d_model=32 there, 48 requested") as err:
    ws_lib.warm_start(d, ws, dict(SMALL, d_model=48, head_dim=24), progress=False)
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match=r"warm_start\.steps=3 there, 4 requested"):
    ws_lib.warm_start(d, dataclasses.replace(ws, steps=4), SMALL, progress=False)


def test_warm_start_stops_at_the_target_accuracy(tmp_path, monkeypatch):
  seen = []

  def fake_eval(params, cfg, tok, examples, budgets, temperature, **kw):
    seen.append((len(examples), tuple(budgets), temperature))
    acc = 0.3 if len(seen) == 1 else 0.55  # Reached at the second check.
    return ws_lib.BudgetEval(tuple(budgets), (acc,), 10.0, 1.0, 0.0)

  monkeypatch.setattr(ws_lib, "evaluate_budgets", fake_eval)
  ws = dataclasses.replace(WS, steps=20, stop_accuracy=0.5, check_from=4, check_every=3,
                           check_budget=40, check_size=12)
  ws_lib.warm_start(str(tmp_path / "ws"), ws, SMALL, progress=False)
  assert seen == [(12, (40,), 0.0)] * 2
  with open(tmp_path / "ws" / "warmstart.json") as f:
    results = json.load(f)["results"]
  assert results["checks"] == [[4, 0.3], [7, 0.55]]
  assert results["steps_run"] == 7
  assert [s for s, _ in results["loss_history"]] == [7]  # Logged every 50 steps, and at the stop.
