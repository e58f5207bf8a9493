"""Supervised warm start: teaches a small decoder the synthetic task's thinking traces before RL.

Also measures accuracy at thinking budgets (cut, insert SPEC §4's texts, decode the answer, grade)
and saves or reuses the result: orbax params, the tokenizer `.model`, a JSON of the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from brpo.tasks.arith import task as arith
from brpo.tasks.data import DataIterator, Example, dedup_train_eval, load_dataset
from models import decoder as dec
from models import masks
from models import tokenizer as tok_lib
from models.config import ModelConfig, get_config

Params = dict[str, Any]
log = logging.getLogger(__name__)

SETTINGS_FILE = "warmstart.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
  """Everything that decides the warm-started model (saved beside it and compared on reuse)."""

  model: str = "tiny"
  task: arith.ArithTask = arith.ArithTask()
  # Small batches learn far more per second here: at batch 16, chains of 3-8 one-digit terms
  # reached ~50% in 1,000-1,500 steps, while batch 64 was at 8% after 300 steps of 4x the tokens.
  # The default task (3-6 terms) reaches 50% in 700-800 steps.
  steps: int = 1500  # At most; see stop_accuracy.
  batch_size: int = 16
  # Greedy accuracy at 96 tokens after 1,200 steps on 3-8 terms (no early stop), seeds 0/1/2:
  # 2e-3 -> 56/78/91%; 3e-3 -> 26/75/-%; 5e-3 -> 16% (seed 0); 8e-3 -> 5% (seed 0).
  learning_rate: float = 2e-3
  warmup_steps: int = 100
  final_lr_fraction: float = 0.1  # The cosine decays to this fraction of the peak.
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  n_train: int = 20_000  # Questions of "arith:train" drawn from (traces vary per visit).
  seed: int = 0
  # Batches are padded to a multiple of this, so a run compiles ~5 shapes; 32 would waste ~8%
  # more time on padding.
  length_bucket: int = 16
  # Early stop. Runs differ widely in when they pick the task up (see learning_rate), so every
  # `check_every` steps from `check_from` on, greedy accuracy at `check_budget` on `check_size`
  # held-out "val" questions is measured, and training stops once it reaches `stop_accuracy`
  # (0 disables): RL then starts with similar room whatever the seed.
  stop_accuracy: float = 0.5
  check_budget: int = 96
  check_every: int = 100
  check_from: int = 600
  check_size: int = 128


# ---------------------------------------------------------------------------------------------
# Batches and the loss.


def make_batch(tokenizer: tok_lib.Tokenizer, traces: Sequence[arith.Trace],
               bucket: int) -> tuple[np.ndarray, np.ndarray]:
  """Traces -> (tokens [B, T] int32 right-padded with pad_id, loss mask [B, T] bool).

  The mask marks tokens the model is trained to predict: thinking, summary and end of sequence,
  not the prompt. T is the longest trace rounded up to a multiple of `bucket`.
  """
  encoded = [arith.encode_trace(tokenizer, t) for t in traces]
  longest = max(len(ids) for ids, _ in encoded)
  t = -(-longest // bucket) * bucket
  tokens = np.full((len(encoded), t), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(encoded), t), bool)
  for i, (ids, prompt_len) in enumerate(encoded):
    tokens[i, :len(ids)] = ids
    mask[i, prompt_len:len(ids)] = True
  return tokens, mask


def _causal_attend(q, k, v, state):
  # Right-padded rows need only causality: padding follows every real token. The fused causal
  # attention is ~1.6x faster than a dense [B, T, T] mask on CPU for this model size.
  return jax.nn.dot_product_attention(q, k, v, is_causal=True), state


def sft_loss(params: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean next-token cross entropy over the masked tokens.

  tokens [B, T] int, mask [B, T] bool (True where the token is a training target) -> scalar.
  """
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t - 1), (b, t - 1))
  hidden, _ = dec.decoder(params, cfg, tokens[:, :-1], positions, _causal_attend,
                          [None] * cfg.n_layers)
  logits = dec.logits_from_hidden(params, cfg, hidden)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  m = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def make_optimizer(ws: WarmStartConfig) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay; norms (1-D parameters) are not decayed."""
  warmup = min(ws.warmup_steps, max(ws.steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=ws.learning_rate, warmup_steps=warmup,
      decay_steps=max(ws.steps, warmup + 1), end_value=ws.learning_rate * ws.final_lr_fraction)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(ws.grad_clip),
      optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=ws.weight_decay, mask=decay_mask))


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation):
  """-> jitted step(params, opt_state, tokens [B, T], mask [B, T]) -> (params, opt_state, loss)."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, tokens, mask):
    loss, grads = jax.value_and_grad(sft_loss)(params, cfg, tokens, mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(params: Params, cfg: ModelConfig, tokenizer: tok_lib.Tokenizer,
          examples: Sequence[Example], ws: WarmStartConfig, progress: bool = True,
          log_every: int = 50, callback: Callable[[int, Params], bool] | None = None
          ) -> tuple[Params, list[tuple[int, float]]]:
  """Runs up to ws.steps supervised steps over gold traces of `examples`.

  `callback(step, params)` runs after every step (step counts from 1); returning True stops
  training there.
  Returns (params, [(step, loss)] logged every `log_every` steps and at the last step; each
  logged loss is the mean over the steps since the previous entry).
  """
  params = jax.tree.map(jnp.copy, params)  # The step donates its input; keep the caller's.
  optimizer = make_optimizer(ws)
  opt_state = optimizer.init(params)
  step_fn = make_train_step(cfg, optimizer)
  batches = DataIterator(examples, ws.batch_size, ws.seed)
  history, pending = [], []
  bar = tqdm.trange(ws.steps, desc="warm start", disable=not progress, dynamic_ncols=True)
  for step in bar:
    rng = np.random.default_rng([ws.seed, step])  # Redundant lines drawn afresh each visit.
    traces = [arith.sample_trace(ex, ws.task, rng) for ex in next(batches)]
    tokens, mask = make_batch(tokenizer, traces, ws.length_bucket)
    params, opt_state, loss = step_fn(params, opt_state, tokens, mask)
    pending.append(loss)
    if (step + 1) % log_every == 0 or step + 1 == ws.steps:
      mean = float(np.mean(jax.device_get(pending)))
      pending = []
      history.append((step + 1, mean))
      bar.set_postfix(loss=f"{mean:.4f}")
      log.info("warm start step %d loss %.4f", step + 1, mean)
    if callback is not None and callback(step + 1, params):
      if pending:
        history.append((step + 1, float(np.mean(jax.device_get(pending)))))
      break
  return params, history


# ---------------------------------------------------------------------------------------------
# Decoding and evaluation at budgets (a small self-contained sampler: one jitted scan).


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "temperature"))
def _generate(params: Params, cfg: ModelConfig, tokens: jax.Array, valid: jax.Array,
              rng: jax.Array, max_new: int, temperature: float) -> jax.Array:
  """Continues left-padded prompts by max_new tokens (no early stop; callers cut at stops).

  tokens, valid: [B, P] (valid False on the left padding) -> new tokens [B, max_new].
  temperature 0 is greedy.
  """
  b, p = tokens.shape
  cache = dec.init_cache(cfg, b, p + max_new)
  positions = masks.positions_from_valid(valid)
  logits, cache = dec.prefill(params, cfg, tokens, positions, masks.causal_mask(valid), cache)
  kv_valid = jnp.concatenate([valid, jnp.zeros((b, max_new), bool)], axis=1)

  def body(carry, i):
    logits, cache, kv_valid, pos, rng = carry
    rng, key = jax.random.split(rng)
    if temperature == 0:
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      tok = jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
    kv_valid = kv_valid.at[:, p + i].set(True)
    logits, cache = dec.decode_step(params, cfg, tok[:, None], pos[:, None], cache, p + i,
                                    kv_valid[:, None, :])
    return (logits[:, 0], cache, kv_valid, pos + 1, rng), tok

  init = (logits, cache, kv_valid, positions[:, -1] + 1, rng)
  _, new = jax.lax.scan(body, init, jnp.arange(max_new))
  return new.T


def generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new: int,
             temperature: float, rng: jax.Array, stop_ids: Sequence[int], pad_id: int,
             bucket: int = 16, batch_size: int = 512) -> list[list[int]]:
  """Samples continuations; each is cut after its first token in `stop_ids` (kept).

  Prompts are left-padded to a multiple of `bucket` so repeated calls reuse compilations.
  Returns one list of new token ids per prompt.
  """
  out: list[list[int]] = []
  stops = set(int(s) for s in stop_ids)
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    rows = -(-len(chunk) // 8) * 8  # Pad the batch too: fewer distinct shapes.
    width = -(-max(len(p) for p in chunk) // bucket) * bucket
    tokens = np.full((rows, width), pad_id, np.int32)
    valid = np.zeros((rows, width), bool)
    for i, prompt in enumerate(chunk):
      tokens[i, width - len(prompt):] = prompt
      valid[i, width - len(prompt):] = True
    valid[len(chunk):, -1] = True  # Filler rows: one visible token, so nothing is degenerate.
    rng, key = jax.random.split(rng)
    new = np.asarray(_generate(params, cfg, jnp.asarray(tokens), jnp.asarray(valid), key,
                               max_new, float(temperature)))
    for row in new[:len(chunk)].tolist():
      cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
      out.append(row[:cut])
  return out


_BOXED = "\\boxed{"


def extract_answer(summary: str) -> str | None:
  """SPEC §4: first blank-line paragraph starting "**Final Answer**\\n", its last \\boxed{...}."""
  for para in re.split(r"\n\s*\n", summary):
    if para.startswith("**Final Answer**\n"):
      start = para.rfind(_BOXED)
      if start < 0:
        return None
      depth, i = 1, start + len(_BOXED)
      for j in range(i, len(para)):
        depth += {"{": 1, "}": -1}.get(para[j], 0)
        if depth == 0:
          return para[i:j]
      return None
  return None


def grade_summary(response: str, answers: Sequence[str]) -> bool:
  """Whether the response (ANSWER_PREFIX + summary) gives one of the accepted `answers`.

  Uses brpo.rewards.grade when that module is present; otherwise an exact match of the
  extracted answer, enough for the integer answers of the synthetic task.
  """
  try:
    from brpo.grading import rewards  # Written alongside; optional here.
  except ImportError:
    rewards = None
  if rewards is not None and hasattr(rewards, "grade"):
    return bool(rewards.grade(response, list(answers)))
  answer = extract_answer(response)
  return answer is not None and answer.strip() in [a.strip() for a in answers]


@dataclasses.dataclass(frozen=True)
class BudgetEval:
  """Accuracy at each budget, plus how the thinkings ended."""

  budgets: tuple[int, ...]
  accuracy: tuple[float, ...]  # [m], fraction correct at each budget
  mean_thinking_tokens: float  # |z| including the closing </think> (b_max when never closed)
  frac_closed: float  # thinkings that closed with </think> within b_max
  frac_eos: float  # thinkings that ended with end of sequence instead (score 0 everywhere)

  def table(self) -> str:
    head = "budget   " + " ".join(f"{b:>6d}" for b in self.budgets)
    row = "accuracy " + " ".join(f"{a:>6.3f}" for a in self.accuracy)
    return (f"{head}\n{row}\nmean thinking {self.mean_thinking_tokens:.1f} tokens, "
            f"closed {self.frac_closed:.3f}, ended with eos {self.frac_eos:.3f}")


def evaluate_budgets(params: Params, cfg: ModelConfig, tokenizer: tok_lib.Tokenizer,
                     examples: Sequence[Example], budgets: Sequence[int], temperature: float,
                     seed: int = 0, summary_tokens: int = 16) -> BudgetEval:
  """Accuracy when the thinking is cut at each budget and the answer forced (SPEC §4, §9).

  One thinking per question, up to max(budgets) tokens. For a budget b: a thinking closed by
  `</think>` within b is followed by ANSWER_PREFIX; otherwise its first b tokens are followed by
  CUT_TEXT + ANSWER_PREFIX. One summary is sampled per distinct context (so budgets past the
  end of a thinking share it). A summary scores only if it answers correctly and the text after
  the prompt holds exactly one `</think>`; a thinking that ended with end of sequence scores 0.
  """
  budgets = tuple(sorted(int(b) for b in budgets))
  if len(tokenizer.think_end_ids) != 1:
    raise ValueError("evaluate_budgets needs a tokenizer with a single </think> id")
  think_end, eos = tokenizer.think_end_ids[0], tokenizer.eos_id
  rng = jax.random.PRNGKey(seed)
  rng_think, rng_sum = jax.random.split(rng)
  prompts = [tokenizer.encode(tok_lib.plain_template(e.question)) for e in examples]
  thinkings = generate(params, cfg, prompts, budgets[-1], temperature, rng_think,
                       (think_end, eos), tokenizer.pad_id)
  cut_ids = tokenizer.encode(arith.CUT_TEXT)
  answer_ids = tokenizer.encode(arith.ANSWER_PREFIX)

  contexts: dict[tuple[int, ...], int] = {}  # distinct context -> its index
  owner: list[int] = []  # context index -> the question it belongs to
  which = np.full((len(examples), len(budgets)), -1)  # -1: scores 0 without a summary
  for i, (prompt, z) in enumerate(zip(prompts, thinkings)):
    if z and z[-1] == eos:
      continue
    for j, b in enumerate(budgets):
      if z and z[-1] == think_end and len(z) <= b:
        ctx = tuple(prompt + z + answer_ids)
      else:
        ctx = tuple(prompt + z[:b] + cut_ids + answer_ids)
      if ctx not in contexts:
        contexts[ctx] = len(contexts)
        owner.append(i)
      which[i, j] = contexts[ctx]
  summaries = generate(params, cfg, [list(c) for c in contexts], summary_tokens, temperature,
                       rng_sum, (eos,), tokenizer.pad_id)
  context_correct = []
  for ctx, summary, i in zip(contexts, summaries, owner):
    # The gate counts `</think>` in thinking + inserted text + summary, i.e. after the prompt.
    one_think_end = (list(ctx[len(prompts[i]):]) + summary).count(think_end) == 1
    response = tokenizer.decode(list(ctx[len(ctx) - len(answer_ids):])
                                + [t for t in summary if t != eos])
    context_correct.append(one_think_end and grade_summary(response, examples[i].answers))
  correct = np.array([[w >= 0 and context_correct[w] for w in row] for row in which])
  closed = np.array([bool(z) and z[-1] == think_end for z in thinkings])
  ended_eos = np.array([bool(z) and z[-1] == eos for z in thinkings])
  return BudgetEval(budgets=budgets, accuracy=tuple(float(a) for a in correct.mean(axis=0)),
                    mean_thinking_tokens=float(np.mean([len(z) for z in thinkings])),
                    frac_closed=float(closed.mean()), frac_eos=float(ended_eos.mean()))


# ---------------------------------------------------------------------------------------------
# Saving, restoring, and the warm start itself.


def _settings(cfg: ModelConfig, ws: WarmStartConfig) -> dict[str, Any]:
  return {"model_config": dataclasses.asdict(cfg),
          "warm_start": dataclasses.asdict(ws)}  # Includes the task settings.


def _differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
  if isinstance(saved, dict) and isinstance(wanted, dict):
    out = []
    for key in sorted(set(saved) | set(wanted)):
      out += _differences(saved.get(key), wanted.get(key), f"{prefix}{key}.")
    return out
  return [] if saved == wanted else [f"{prefix[:-1]}={saved!r} there, {wanted!r} requested"]


def save(directory: str, cfg: ModelConfig, params: Params, ws: WarmStartConfig,
         results: dict[str, Any] | None = None) -> None:
  """Writes params (orbax, under <dir>/params) and then the settings JSON, which marks the
  checkpoint complete. The tokenizer is expected at <dir>/tokenizer.model already."""
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, PARAMS_DIR), params, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  doc = dict(_settings(cfg, ws), tokenizer=TOKENIZER_FILE, results=results or {})
  tmp = os.path.join(directory, SETTINGS_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=1)
  os.replace(tmp, os.path.join(directory, SETTINGS_FILE))


def load(directory: str) -> tuple[ModelConfig, Params, tok_lib.SentencePieceTokenizer,
                                  dict[str, Any]]:
  """Reads a saved warm start -> (cfg, params, tokenizer, the settings JSON)."""
  directory = os.path.abspath(directory)
  path = os.path.join(directory, SETTINGS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} holds no warm start ({SETTINGS_FILE} is missing)")
  with open(path) as f:
    doc = json.load(f)
  cfg = ModelConfig(**doc["model_config"])
  tokenizer = tok_lib.SentencePieceTokenizer(os.path.join(directory, doc["tokenizer"]))
  # Onto this process's first device: with several processes the saved layout (process 0's
  # device) is not one that every process can address.
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here),
                          jax.eval_shape(lambda: dec.init_params(cfg, jax.random.PRNGKey(0))))
  ckptr = ocp.StandardCheckpointer()
  params = ckptr.restore(os.path.join(directory, PARAMS_DIR), abstract)
  ckptr.close()
  return cfg, params, tokenizer, doc


def warm_start(directory: str, ws: WarmStartConfig = WarmStartConfig(),
               model_overrides: dict[str, Any] | None = None, progress: bool = True,
               eval_examples: Sequence[Example] = ()) -> tuple[
                   ModelConfig, Params, tok_lib.SentencePieceTokenizer]:
  """The warm-started model for `ws`: reused from `directory` when saved there, else trained.

  A directory holding a warm start with other settings is an error (the message lists them).
  Training drops from the training questions any that are in `eval_examples`.
  Returns (cfg with the tokenizer's vocab_size, params, tokenizer).
  """
  directory = os.path.abspath(directory)
  tok_path = os.path.join(directory, TOKENIZER_FILE)
  settings_path = os.path.join(directory, SETTINGS_FILE)
  if os.path.isfile(settings_path):
    with open(settings_path) as f:
      saved = json.load(f)
    tokenizer = tok_lib.SentencePieceTokenizer(tok_path)
    cfg = get_config(ws.model, vocab_size=tokenizer.vocab_size, **(model_overrides or {}))
    diff = _differences({k: saved.get(k) for k in ("model_config", "warm_start")},
                        json.loads(json.dumps(_settings(cfg, ws))))
    if diff:
      raise ValueError(f"{settings_path}: this directory holds a warm start with other settings "
                       f"({'; '.join(diff)}); use another directory or delete this one")
    cfg, params, tokenizer, _ = load(directory)
    log.info("warm start reused from %s", directory)
    return cfg, params, tokenizer

  os.makedirs(directory, exist_ok=True)
  start = time.time()
  tokenizer = arith.train_tokenizer(tok_path, ws.task, ws.seed)
  cfg = get_config(ws.model, vocab_size=tokenizer.vocab_size, **(model_overrides or {}))
  examples = arith.generate(ws.n_train, arith.split_seed("train", ws.seed), ws.task,
                            prefix="arith-train")
  if eval_examples:
    examples, dropped = dedup_train_eval(examples, eval_examples)
    log.info("warm start: dropped %d training questions that are in the eval set", dropped)
  checks: list[tuple[int, float]] = []
  callback = None
  if ws.stop_accuracy > 0:
    held_out = arith.generate(ws.check_size, arith.split_seed("val", ws.seed), ws.task,
                              prefix="arith-val")
    examples, dropped = dedup_train_eval(examples, held_out)
    log.info("warm start: dropped %d training questions that are in the held-out set", dropped)

    def callback(step: int, params: Params) -> bool:
      if step < ws.check_from or (step - ws.check_from) % ws.check_every:
        return False
      acc = evaluate_budgets(params, cfg, tokenizer, held_out, [ws.check_budget], 0.0).accuracy[0]
      checks.append((step, acc))
      log.info("warm start step %d: held-out greedy accuracy at %d tokens %.3f", step,
               ws.check_budget, acc)
      return acc >= ws.stop_accuracy

  params = dec.init_params(cfg, jax.random.PRNGKey(ws.seed))
  params, history = train(params, cfg, tokenizer, examples, ws, progress=progress,
                          callback=callback)
  elapsed = time.time() - start
  save(directory, cfg, params, ws, {"loss_history": history, "checks": checks,
                                    "steps_run": history[-1][0] if history else 0,
                                    "train_seconds": elapsed})
  log.info("warm start: %d steps in %.1f s, saved to %s", history[-1][0] if history else 0,
           elapsed, directory)
  return cfg, params, tokenizer


# ---------------------------------------------------------------------------------------------
# Command line: train (or reuse) and report accuracy per budget.


def _parse_overrides(text: str) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for item in filter(None, text.split(",")):
    key, _, value = item.partition("=")
    out[key] = json.loads(value) if value not in ("", None) else value
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", required=True, help="where the warm start is saved or reused")
  parser.add_argument("--steps", type=int, default=WarmStartConfig.steps)
  parser.add_argument("--batch_size", type=int, default=WarmStartConfig.batch_size)
  parser.add_argument("--learning_rate", type=float, default=WarmStartConfig.learning_rate)
  parser.add_argument("--warmup_steps", type=int, default=WarmStartConfig.warmup_steps)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--stop_accuracy", type=float, default=WarmStartConfig.stop_accuracy,
                      help="stop once held-out greedy accuracy reaches this (0: never)")
  parser.add_argument("--task", default="", help="e.g. terms=3-6,digits=2,p_check=0.5")
  parser.add_argument("--model_overrides", default="", help="e.g. d_model=128,n_layers=2")
  parser.add_argument("--eval", default=None,
                      help="eval data spec (default arith:test:n=256 with --task's settings)")
  parser.add_argument("--budgets", default="16,32,48,64,96,128")
  parser.add_argument("--temperatures", default="0,0.6")
  args = parser.parse_args(argv)
  # force: an imported library may have configured the root logger already. Only this module's
  # messages at INFO: orbax is chatty there.
  logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
  log.setLevel(logging.INFO)

  _, _, _, task = arith.parse_spec("arith:train:" + args.task)
  ws = WarmStartConfig(task=task, steps=args.steps, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                       seed=args.seed, stop_accuracy=args.stop_accuracy)
  evals = load_dataset(args.eval or f"arith:test:n=256,{args.task}".rstrip(","))
  start = time.time()
  cfg, params, tokenizer = warm_start(args.dir, ws, _parse_overrides(args.model_overrides),
                                      eval_examples=evals)
  print(f"warm start: {time.time() - start:.1f} s wall ({cfg.n_params:,} parameters)")
  budgets = [int(b) for b in args.budgets.split(",")]
  for temp in (float(t) for t in args.temperatures.split(",")):
    t0 = time.time()
    result = evaluate_budgets(params, cfg, tokenizer, evals, budgets, temp, seed=args.seed)
    print(f"temperature {temp} ({len(evals)} questions, {time.time() - t0:.1f} s)\n"
          + result.table())


if __name__ == "__main__":
  main()
