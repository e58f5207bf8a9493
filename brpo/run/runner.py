"""A whole run from an ExperimentConfig: model and data set-up, the RL loop with checkpoints and
logs, and evaluation. experiments/gsm_math.py parses flags into the config and calls `main`.

Outputs in the workdir: metrics.jsonl (one line per RL step), tb/ (TensorBoard), checkpoints/,
eval.json, eval_samples.jsonl and accuracy.png (evaluation), config.json.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
import tqdm
from etils import epath

from brpo.rollout import anytime as at
from brpo.tasks import data as data_lib
from brpo.run import evaluation
from brpo.run.loading import encode_prompts, load_model, maybe_initialize_distributed
from brpo.run.metrics import MetricsWriter, run_table
from brpo.run import rl_step as rl_lib
from brpo.train import step as train_lib
from brpo.rollout import sampling
from brpo import grading
from brpo.run.checkpointing import Checkpointer
from brpo.run.config import ExperimentConfig, OptimConfig, RLConfig
from models import decoder as dec
from models import sharding as shd
from models.config import ModelConfig
from models.params import for_decoding, relayout

log = logging.getLogger("brpo")


# ---------------------------------------------------------------------------------------------
# Set-up.


def _prompt_length(prompts: Sequence[Sequence[int]]) -> int:
  """The padded prompt length that fits every prompt of a data set: the cap of `prompt_bucket`."""
  return sampling.bucket_length(max(len(p) for p in prompts))


# ---------------------------------------------------------------------------------------------
# Runs.


class Run:
  """The pieces of a run shared by training and evaluation."""

  def __init__(self, ec: ExperimentConfig):
    self.ec = ec
    run = ec.run
    self.is_main = jax.process_index() == 0
    epath.Path(run.workdir).mkdir(parents=True, exist_ok=True)  # a local folder or gs://...
    try:
      self.mesh = shd.make_mesh(run.mesh)
    except ValueError as e:
      raise ValueError(f"--mesh={','.join(map(str, run.mesh))}: {e}") from None
    eval_examples = data_lib.load_dataset(ec.data.path(ec.data.eval), ec.data.on_bad_record)
    if ec.data.eval_size:
      eval_examples = eval_examples[:ec.data.eval_size]
    self.grader = grading.Grader(num_workers=run.grader_workers, timeout_s=run.grader_timeout_s)
    try:
      self.cfg, params, self.tokenizer = load_model(ec, eval_examples, self.grader)
    except BaseException:
      self.grader.close()
      raise
    self.params = params
    self.toks = at.AnytimeTokens.from_tokenizer(self.tokenizer)
    ec.check_context(self.cfg.max_seq_len, sampling.bucket_length(ec.model.max_prompt_len),
                     max(len(self.toks.insert_running), len(self.toks.insert_ended)))
    ev = encode_prompts(eval_examples, self.tokenizer, ec.model.template,
                        ec.model.max_prompt_len, ec.model.long_prompts, f"--eval_data={ec.data.eval}")
    self.eval_prompts, self.eval_refs, self.eval_skipped = ev
    if self.eval_skipped:
      log.warning("--eval_data=%s: %d questions longer than --max_prompt_len=%d skipped",
                  ec.data.eval, self.eval_skipped, ec.model.max_prompt_len)
    self.eval_examples = eval_examples

  def evaluate(self, params, step: int | None = None, limit: int = 0,
               prompts: tuple[list, list] | None = None) -> dict[str, Any]:
    """Anytime evaluation on the eval set (its first `limit` questions when limit > 0), or on
    other (prompts, references)."""
    ec = self.ec
    b_max = ec.eval.b_max or ec.rl.budget_spec.b_max
    budgets = evaluation.eval_budgets(b_max, ec.eval.n_budgets)
    all_prompts, all_refs = prompts or (self.eval_prompts, self.eval_refs)
    n = limit or len(all_prompts)
    params, cfg = for_decoding(params, self.cfg)
    result = evaluation.evaluate(
        params, cfg, self.tokenizer, self.toks, all_prompts[:n], all_refs[:n],
        budgets=budgets, samples=ec.eval.samples,
        summary_len=ec.eval.summary_len or ec.rl.summary_len, temperature=ec.eval.temperature,
        top_p=ec.eval.top_p, grader=self.grader,
        rng=jax.random.fold_in(jax.random.PRNGKey(ec.run.seed + 1), step or 0),
        batch_prompts=min(64, max(8, ec.rl.prompts_per_batch)),
        prompt_length=None, prompt_cap=_prompt_length(all_prompts),
        progress=ec.run.progress and self.is_main, mesh=self.mesh,
        examples=evaluation.EXAMPLES_PER_BUDGET)
    result["step"] = step
    result["eval_data"] = ec.data.eval
    return result

  def save_eval(self, result: dict[str, Any], name: str = "eval", plot: str = "",
                label: str = "") -> dict[str, Any]:
    """Process 0 writes <name>.json and its samples, <name>_samples.jsonl, and with `plot` the
    accuracy against budget as <workdir>/<plot> (one line, `label`: default the workdir's
    name). Returns the result without the samples."""
    workdir = self.ec.run.workdir
    out = {k: v for k, v in result.items() if k != "examples"}
    if self.is_main:
      evaluation.write_eval(result, workdir, name)
      if plot:
        evaluation.plot_accuracy({label or os.path.basename(workdir.rstrip("/")): out},
                                 os.path.join(workdir, plot), title=label)
    return out

  def close(self):
    self.grader.close()


def train(ec: ExperimentConfig) -> dict[str, Any]:
  """The RL loop; resumes from the latest checkpoint in the workdir. Returns the final eval."""
  run, rl = ec.run, ec.rl
  # Both before the model is loaded (or a warm start trained): these fail in seconds.
  check_workdir(ec)
  train_examples = data_lib.load_dataset(ec.data.path(ec.data.train), ec.data.on_bad_record)
  r = Run(ec)
  cfg, mesh = r.cfg, r.mesh
  train_examples, dropped = data_lib.dedup_train_eval(train_examples, r.eval_examples)
  prompts, refs, skipped = encode_prompts(
      train_examples, r.tokenizer, ec.model.template, ec.model.max_prompt_len,
      ec.model.long_prompts, f"--train_data={ec.data.train}")
  log.info("train: %d questions (%d dropped as in eval, %d too long); eval: %d", len(prompts),
           dropped, skipped, len(r.eval_prompts))
  prompt_length = _prompt_length(prompts)
  response_len = rl_lib.response_len(rl, r.toks)
  updates_per_step = rl.ppo_epochs * (rl.prompts_per_batch // rl.mini_batch_prompts)
  optimizer, train_step, logprob_fn = _train_fns(cfg, ec.optim, rl,
                                                 run.steps * updates_per_step, response_len, mesh)
  state = train_lib.init_train_state(r.params, optimizer, run.seed, mesh, dec.param_axes(cfg),
                                  with_ref=rl.kl_coef > 0)
  del r.params
  # The state keeps its layout (jit follows the committed shardings of its inputs; rows of a
  # mini-batch are split over (data, fsdp) by rl._put_rows).
  lr_fn = train_lib.lr_schedule(ec.optim, run.steps * updates_per_step)
  ctx = rl_lib.RLContext(cfg=cfg, tokenizer=r.tokenizer, toks=r.toks, rl=rl, grader=r.grader,
                         train_step=train_step, lr_fn=lambda s: lr_fn(s * updates_per_step),
                         mesh=mesh, prompt_length=prompt_length, logprob_fn=logprob_fn)
  data = data_lib.DataIterator(list(range(len(prompts))), rl.prompts_per_batch, run.seed)
  # Resuming: the state, the data position and the step come from the latest complete
  # checkpoint (orbax renames a step's folder into place only once it is whole); every other
  # input of a step is a function of these and the config, so the run continues as if never
  # stopped. The metrics of later steps, written before a kill, are dropped and redone.
  ckpt = Checkpointer(os.path.join(run.workdir, "checkpoints"), keep=run.keep_checkpoints,
                      cleanup_tmp=True)
  signature = ec.training_signature()
  start = 0
  if ckpt.latest_step() is not None:
    meta = ckpt.restore_meta()
    if meta.get("signature") != signature:
      diff = _signature_diff(meta.get("signature") or {}, signature)
      raise ValueError(f"{run.workdir}: holds a checkpoint of a different config ({diff}); "
                       "use another --workdir or the same flags")
    saved_scan = bool(meta.get("config", {}).get("model", {}).get("scan_layers", False))
    state, meta = restore_state(ckpt, state, saved_scan)
    data.restore(meta["data"])
    start = int(meta["step"])
    log.info("resumed from %s at step %d", ckpt.directory, start)
  # Also at step 0: a run killed before its first checkpoint starts over, and the lines (and
  # TensorBoard events) its first attempt wrote are dropped.
  writer = MetricsWriter(run.workdir, enabled=r.is_main, resume_step=start)
  history = [h for h in writer.truncate_after(start) if "loss" in h]
  if r.is_main:
    epath.Path(run.workdir, "config.json").write_text(ec.to_json())
  bad_streak = 0
  # wall_s counts on from the restored step's value, so that it stays a run's total time.
  t_start = time.time() - (history[-1]["wall_s"] if history else 0.0)
  bar = tqdm.tqdm(range(start, run.steps), initial=start, total=run.steps, desc="rl",
                  disable=not (run.progress and r.is_main))
  try:
    for step in bar:
      batch = next(data)
      state, metrics = rl_lib.rl_step(state, [prompts[i] for i in batch],
                                      [refs[i] for i in batch], ctx)
      metrics["wall_s"] = time.time() - t_start
      writer.write(step + 1, metrics)
      history.append({"step": step + 1, **metrics})
      bar.set_postfix(anytime=f"{metrics['anytime_score']:.3f}",
                      reward=f"{metrics['reward']:.3f}", loss=f"{metrics['loss']:.4f}")
      if metrics["bad_updates"]:
        # A skipped update kept the parameters; a step with one is never checkpointed, so the
        # last checkpoint stays the one before the streak.
        bad_streak += 1
        log.warning("step %d: non-finite loss or gradients, %d of %d updates skipped (%d bad "
                    "steps in a row)", step + 1, metrics["bad_updates"], updates_per_step,
                    bad_streak)
        if bad_streak >= run.max_bad_steps:
          raise FloatingPointError(
              f"{bad_streak} consecutive steps with non-finite loss or gradients (steps "
              f"{step + 2 - bad_streak}-{step + 1}); stopping. The last checkpoint in "
              f"{ckpt.directory} is intact (step {ckpt.latest_step()}); lower --lr or raise "
              "--max_bad_steps")
        continue
      bad_streak = 0
      done = step + 1
      # Evaluate before saving: a run killed in between redoes the step and its evaluation.
      if run.eval_every and done % run.eval_every == 0 and done != run.steps:
        res = r.save_eval(r.evaluate(state.params, done, ec.eval.periodic_size),
                          f"eval_step{done}")
        if r.is_main:
          writer.write(done, {"eval/anytime_score": res["anytime_score"],
                              "eval/final_accuracy": res["final_accuracy"]})
      if run.checkpoint_every and (done % run.checkpoint_every == 0 or done == run.steps):
        ckpt.save(done, state, {"step": done, "data": data.state(), "signature": signature,
                                "config": ec.to_dict()})
    result = r.save_eval(r.evaluate(state.params, run.steps), plot="accuracy.png")
    if r.is_main:
      print(run_table(history, result, time.time() - t_start))
    return result
  finally:
    writer.close()
    ckpt.close()
    r.close()


def restore_state(ckpt: Checkpointer, template, saved_scan_layers: bool, step=None):
  """(state, meta) of a checkpoint saved in either parameter layout (stacked for
  --scan_layers, or per layer), returned in the layout and shardings of `template` (a state of
  the current run). Params, ref_params and the optimizer's moments are converted alike."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      template)
  state, meta = ckpt.restore(relayout(abstract, saved_scan_layers), step)
  scan_now = dec.is_stacked(template.params)
  if saved_scan_layers != scan_now:
    log.info("checkpoint layers %s: converted to the run's layout",
             "stacked" if saved_scan_layers else "per layer")
    state = jax.device_put(relayout(state, scan_now),
                           jax.tree.map(lambda x: x.sharding, abstract))
  return state, meta


@functools.lru_cache(maxsize=8)
def _train_fns(cfg: ModelConfig, optim: OptimConfig, rl: RLConfig, total_updates: int,
               response_len: int, mesh=None):
  """(optimizer, jitted train step, jitted log-prob function) of a configuration, built once per
  process: later runs in the same process (an ablation, a test, a resumed run in a notebook)
  reuse their compilations. `_train_fns.cache_clear()` drops them."""
  optimizer = train_lib.make_optimizer(optim, total_updates, cfg)
  return (optimizer, train_lib.make_train_step(cfg, optimizer, rl, response_len, mesh),
          train_lib.make_logprob_fn(cfg, rl, mesh))


def _trained_params(r: Run, ec: ExperimentConfig):
  """(params, step): the workdir's latest checkpoint if any, else the initial model (step None)."""
  params, step = r.params, None
  ckdir = os.path.join(ec.run.workdir, "checkpoints")
  if epath.Path(ckdir).is_dir():
    ckpt = Checkpointer(ckdir)
    if ckpt.latest_step() is not None:
      # The saved state's tree depends on the saved run's optimizer: rebuild its template.
      saved = config_from_dict(ckpt.restore_meta()["config"])
      upd = saved.rl.ppo_epochs * (saved.rl.prompts_per_batch // saved.rl.mini_batch_prompts)
      # The optimizer as the saved run built it: weight decay masked to the matrices (this
      # version) or, for a checkpoint written before that, applied to every parameter (its
      # optimizer state has no mask node). Either parameter layout (--scan_layers) is read.
      state = None
      for masked in (True, False):
        opt = train_lib.make_optimizer(saved.optim, saved.run.steps * upd,
                                       r.cfg if masked else None)
        template = train_lib.init_train_state(params, opt, saved.run.seed, r.mesh,
                                              dec.param_axes(r.cfg),
                                              with_ref=saved.rl.kl_coef > 0)
        try:
          state, _ = restore_state(ckpt, template, saved.model.scan_layers)
          break
        except (ValueError, KeyError, TypeError):
          if not masked:
            raise
      params, step = state.params, ckpt.latest_step()
      log.info("evaluating checkpoint step %d of %s", step, ckdir)
    ckpt.close()
  if step is None:  # laid out on the mesh as training would (rollout rows are split over it)
    params = shd.shard_tree(jax.device_get(params), dec.param_axes(r.cfg), r.mesh)
  return params, step


def evaluate_only(ec: ExperimentConfig) -> dict[str, Any]:
  """--mode=eval: the latest checkpoint of the workdir if any, else the initial model."""
  r = Run(ec)
  try:
    params, step = _trained_params(r, ec)
    # result["step"]: None for the initial model
    result = r.save_eval(r.evaluate(params, step), plot="accuracy.png")
    print(evaluation.budget_table(result))
    return result
  finally:
    r.close()


def evaluate_benchmarks(ec: ExperimentConfig) -> dict[str, Any]:
  """--mode=benchmarks: the checkpoint (or initial model) on every set of --eval_benchmarks
  (default the paper's five), with the same evaluation settings as --mode=eval. Writes
  eval_<name>.json, eval_<name>_samples.jsonl and accuracy_<name>.png per benchmark and
  benchmarks.json (process 0 writes); prints the paper's table (anytime score and final
  accuracy per benchmark, and the average)."""
  sets = ec.eval.benchmark_files()
  loaded = []
  for name, spec in sets:  # all files checked before the model is loaded
    examples = data_lib.load_dataset(ec.data.path(spec), ec.data.on_bad_record)
    loaded.append((name, spec, examples[:ec.data.eval_size] if ec.data.eval_size else examples))
  r = Run(ec)
  try:
    params, step = _trained_params(r, ec)
    results = {}
    for name, spec, examples in loaded:
      prompts, refs, skipped = encode_prompts(examples, r.tokenizer, ec.model.template,
                                              ec.model.max_prompt_len, ec.model.long_prompts,
                                              f"--eval_benchmarks={name}={spec}")
      result = r.evaluate(params, step, prompts=(prompts, refs))
      result.update(eval_data=spec, skipped_long=skipped)
      results[name] = result = r.save_eval(result, f"eval_{name}", plot=f"accuracy_{name}.png",
                                           label=name)
      log.info("%s: anytime %.3f, final %.3f", name, result["anytime_score"],
               result["final_accuracy"])
    summary = {"step": step, "benchmarks": results,
               "average": {k: float(np.mean([x[k] for x in results.values()]))
                           for k in ("anytime_score", "final_accuracy")}}
    if r.is_main:
      evaluation.write_eval(summary, ec.run.workdir, "benchmarks")
    print(evaluation.benchmark_table(results))
    return summary
  finally:
    r.close()


def config_from_dict(d: dict[str, Any]) -> ExperimentConfig:
  """The inverse of ExperimentConfig.to_dict (a checkpoint's saved config; keys of settings
  that no longer exist are dropped, new settings take their defaults)."""
  return ExperimentConfig.from_dict(d)


def check_workdir(ec: ExperimentConfig) -> None:
  """Raises ValueError when the workdir holds a checkpoint of a different training config.

  Only reads: the checkpoint and every other file of the workdir stay as they are.
  """
  directory = os.path.join(ec.run.workdir, "checkpoints")
  if not epath.Path(directory).is_dir():
    return
  ckpt = Checkpointer(directory)
  try:
    if ckpt.latest_step() is None:
      return
    saved = ckpt.restore_meta().get("signature") or {}
  finally:
    ckpt.close()
  now = ec.training_signature()
  if saved != now:
    raise ValueError(f"{ec.run.workdir}: holds a checkpoint of a different config "
                     f"({_signature_diff(saved, now)}); use another --workdir or the same flags")


def _signature_diff(saved: dict[str, Any], now: dict[str, Any]) -> str:
  out = []
  for g in sorted(set(saved) | set(now)):
    for k in sorted(set(saved.get(g, {})) | set(now.get(g, {}))):
      a, b = saved.get(g, {}).get(k), now.get(g, {}).get(k)
      if a != b:
        out.append(f"{k}: saved {a!r}, now {b!r}")
  return "; ".join(out[:6]) + ("; ..." if len(out) > 6 else "")


def main(ec: ExperimentConfig) -> dict[str, Any]:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
  # Our progress at INFO; the libraries' INFO chatter (orbax's per-save lines, JAX's backend
  # probing) only from WARNING up.
  logging.getLogger("brpo").setLevel(logging.INFO)
  for name in ("absl", "jax", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  maybe_initialize_distributed(ec.run.distributed)
  modes = {"train": train, "eval": evaluate_only, "benchmarks": evaluate_benchmarks}
  return modes[ec.run.mode](ec)
