"""Setting a run up: jax.distributed, the model (warm start, random init or a checkpoint) and
its tokenizer, and prompts encoded with the chosen template.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from etils import epath

from brpo import grading
from brpo.rollout import anytime as at
from brpo.run import evaluation
from brpo import paths
from brpo.run.config import ExperimentConfig
from brpo.tasks import data as data_lib
from models import decoder as dec
from models import tokenizer as tok_lib
from models.config import CONFIGS, RUNTIME_FIELDS, get_config
from models.params import relayout

log = logging.getLogger("brpo")


def maybe_initialize_distributed(mode: str) -> None:
  """jax.distributed.initialize for multi-process runs ("on"; "auto" does it on TPU pods and when
  a coordinator address is in the environment).

  Where JAX detects the cluster (TPU pods, SLURM, Open MPI, Kubernetes) it finds the process
  count and index itself; elsewhere (several processes on one machine, hand-started hosts) set
  JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process.
  """
  if mode == "off" or jax.distributed.is_initialized():
    return
  env = os.environ
  auto = any(k in env for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")) or (
      "TPU_WORKER_HOSTNAMES" in env and "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if mode == "on" or auto:
    kwargs = {name: int(env[var]) for name, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                   ("process_id", "JAX_PROCESS_ID")) if var in env}
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d; %d local devices of %d", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def held_out_accuracy_fn(grader=None, template: str = "plain") -> Callable:
  """The warm start's stop check: greedy accuracy at one budget, by the main evaluator (graded
  by `grader`, or by a one-worker grader opened for each check), prompts in `template`."""

  def accuracy(params, cfg, tokenizer, examples, budget: int) -> float:
    if grader is None:
      with grading.Grader(num_workers=1) as own:
        return held_out_accuracy_fn(own, template)(params, cfg, tokenizer, examples, budget)
    prompts, refs, _ = encode_prompts(examples, tokenizer, template, cfg.max_seq_len, "skip",
                                      "warm start held-out set")
    result = evaluation.evaluate(
        params, cfg, tokenizer, at.AnytimeTokens.from_tokenizer(tokenizer), prompts, refs,
        budgets=[budget], summary_len=16, temperature=0.0, grader=grader,
        rng=jax.random.PRNGKey(0), batch_prompts=len(prompts), progress=False)
    return result["final_accuracy"]

  return accuracy


def load_model(ec: ExperimentConfig, eval_examples: Sequence[data_lib.Example] = (),
               grader=None):
  """(ModelConfig, params, tokenizer) for `ec.model`; `grader` serves a warm start's checks."""
  cfg, params, tokenizer = _load_model(ec, eval_examples, grader)
  if ec.run.init_ulp:
    params = nudge_ulps(params, ec.run.init_ulp)
  # How the stack runs (remat, scanned layers, attention block): the parameters follow the layout.
  cfg = cfg.replace(**{f: getattr(ec.model, f) for f in RUNTIME_FIELDS})
  return cfg, relayout(params, cfg.scan_layers), tokenizer


def nudge_ulps(params, n: int):
  """Every floating-point leaf moved by |n| ulps towards +inf (n > 0) or -inf (n < 0), each in
  its own dtype: the smallest change of the initial parameters, for measuring how far rounding
  alone moves a run (experiments/default_spread.py). Integer leaves are kept."""

  def nudge(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    to = jnp.asarray(jnp.inf if n > 0 else -jnp.inf, x.dtype)
    for _ in range(abs(n)):
      x = jnp.nextafter(x, to)
    return x

  return jax.tree.map(nudge, params)


def _load_model(ec: ExperimentConfig, eval_examples, grader):
  spec = ec.model
  numerics = dict(dtype=spec.dtype, param_dtype=spec.param_dtype)
  if spec.init == "warmstart":
    from brpo.tasks.arith import warmstart
    from brpo.tasks.arith import task as arith

    if not ec.data.train.startswith("arith:"):
      raise ValueError(f"--init=warmstart trains on the arithmetic task's gold traces, but "
                       f"--train_data={ec.data.train!r}; use --init=checkpoint or --init=random")
    _, _, _, task = arith.parse_spec(ec.data.train)
    base = "" if spec.model in CONFIGS else spec.model  # a checkpoint: fine-tuned, not trained
    fields = dict(model=spec.model, task=task, seed=ec.run.warmstart_seed,
                  stop_accuracy=ec.run.warmstart_stop_accuracy, base=base,
                  template=spec.template)
    if base:
      fields.update(warmstart.PRETRAINED, check_budget=ec.rl.support[-1])
    if ec.run.warmstart_steps:
      fields["steps"] = ec.run.warmstart_steps
    if ec.run.warmstart_lr:
      fields["learning_rate"] = ec.run.warmstart_lr
    ws = warmstart.WarmStartConfig(**fields)
    if jax.process_count() > 1 and not epath.Path(
        ec.run.warmstart_dir, warmstart.SETTINGS_FILE).is_file():
      # Several processes would all train it and write one directory at once.
      raise ValueError(f"--warmstart_dir={ec.run.warmstart_dir}: no warm start there; with "
                       "several processes, make it first with one process (the same flags "
                       "and --steps=0)")
    cfg, params, tokenizer = warmstart.warm_start(
        ec.run.warmstart_dir, ws, {"dtype": spec.dtype} if base else None,
        progress=ec.run.progress, eval_examples=eval_examples,
        held_out_accuracy=held_out_accuracy_fn(grader, spec.template))
    return cfg.replace(**numerics), params, tokenizer
  if spec.init == "random":
    if spec.model not in CONFIGS:
      raise ValueError(f"--model={spec.model!r}: --init=random needs a named config "
                       f"({', '.join(CONFIGS)})")
    if not spec.tokenizer:
      raise ValueError("--init=random needs --tokenizer (a .model or tokenizer.json file)")
    tokenizer = tok_lib.load_tokenizer(spec.tokenizer)
    cfg = get_config(spec.model, **numerics)
    if tokenizer.vocab_size > cfg.vocab_size:
      cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    return cfg, dec.init_params(cfg, jax.random.PRNGKey(ec.run.seed)), tokenizer
  if spec.init == "checkpoint":
    from models import checkpoint as ckpt_lib

    path = ckpt_lib.resolve(spec.model)
    if path.endswith(".gguf"):
      cfg, params = ckpt_lib.load_gguf(path, dtype=spec.param_dtype)
      tok_path = spec.tokenizer or _gguf_tokenizer(ckpt_lib, path, ec.run.workdir)
    else:
      cfg, params = ckpt_lib.load_hf(path, dtype=spec.param_dtype)
      tok_path = spec.tokenizer or path
    return cfg.replace(**numerics), params, tok_lib.load_tokenizer(tok_path)
  raise ValueError(f"--init={spec.init!r}: must be warmstart, random or checkpoint")


def _gguf_tokenizer(ckpt_lib, path: str, workdir: str) -> str:
  """Exports a GGUF's tokenizer to <workdir>/tokenizer; returns the tokenizer.json path. For a
  remote workdir (gs://...) the export goes to a local temporary folder (the tokenizers package
  reads local files), is copied there, and the local path is returned."""
  out = os.path.join(workdir, "tokenizer")
  if not paths.is_remote(workdir):
    return ckpt_lib.tokenizer_from_gguf(path, out)
  local = tempfile.mkdtemp(prefix="brpo_tokenizer_")
  tok_path = ckpt_lib.tokenizer_from_gguf(path, local)
  paths.copy_files(local, out)
  return tok_path


def encode_prompts(examples: Sequence[data_lib.Example], tokenizer, template: str,
                   max_len: int, policy: str, what: str):
  """Examples -> (prompt token lists, references, number skipped for being too long)."""
  fmt = tok_lib.get_template(template)
  prompts, refs, skipped = [], [], 0
  for e in examples:
    ids = tokenizer.encode(fmt(e.question))
    if len(ids) > max_len:
      if policy == "error":
        raise ValueError(f"{what}: question {e.id!r} is {len(ids)} tokens, more than "
                         f"--max_prompt_len={max_len} (or use --long_prompts=skip)")
      skipped += 1
      continue
    prompts.append(ids)
    refs.append(e.answers if e.alternatives else e.answer)
  if not prompts:
    raise ValueError(f"{what}: no question fits in --max_prompt_len={max_len}")
  return prompts, refs, skipped
