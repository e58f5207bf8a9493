"""Checkpoints of a run with orbax: the train state (params, optimizer, step, RNG) restored
straight into its sharded layout, plus JSON metadata (config, data position).

Orbax writes each step into a temporary folder ("<step>.orbax-checkpoint-tmp") and renames it
to "<step>" when complete (on object stores it marks completion with a commit file instead), so a
run killed mid-save never leaves a checkpoint that a restart would pick up; the restart deletes
the unfinished folder (`cleanup_tmp`). With several processes every one calls `save` and `restore`: each writes
and reads the shards it holds, process 0 the metadata.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from brpo import paths


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with items "state" and "meta"."""

  def __init__(self, directory: str, keep: int = 3, save_every: int = 1,
               cleanup_tmp: bool = False):
    """`cleanup_tmp`: delete unfinished step folders left by a killed run (only the run that
    writes this directory may: an evaluation beside it would delete a save in progress)."""
    self.directory = paths.resolve(directory)  # absolute when local; gs://... as it is
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                           create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=cleanup_tmp)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))
    self.save_every = save_every

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    self.manager.wait_until_finished()
    return saved

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta). `abstract_state` is a state (or its jax.eval_shape) whose arrays'
    shardings say where each restored array goes."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def close(self):
    self.manager.close()
