"""What a run writes as it goes: metrics.jsonl (one JSON object per RL step), TensorBoard
scalars, and the end-of-run table.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from etils import epath

from brpo.run import evaluation
from brpo import paths

log = logging.getLogger("brpo")


class MetricsWriter:
  """metrics.jsonl (one JSON object per step) and a TensorBoard writer; process 0 only.

  `resume_step`: the step of the checkpoint a resumed run restored. TensorBoard then drops the
  earlier files' events from that step on (they will be redone); call `truncate_after` for the
  JSONL file.

  A remote workdir (gs://...) goes through etils.epath: each metrics.jsonl write rewrites the
  whole object (object stores have no reliable append; one object write is atomic), and
  TensorBoard writes its events to a local temporary folder copied to <workdir>/tb at each
  flush.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = epath.Path(workdir, "metrics.jsonl")
    self.remote = paths.is_remote(workdir)
    self.tb = None
    self._tb_dir = epath.Path(workdir, "tb")
    self._tb_local = None
    if enabled:
      from tensorboardX import SummaryWriter

      logdir = os.fspath(self._tb_dir)
      if self.remote:
        self._tb_local = tempfile.mkdtemp(prefix="brpo_tb_")
        logdir = self._tb_local
        log.info("TensorBoard events go to %s and are copied to %s", logdir, self._tb_dir)
      self.tb = SummaryWriter(logdir,
                              purge_step=None if resume_step is None else resume_step + 1)

  def truncate_after(self, step: int) -> list[dict[str, Any]]:
    """On resume: drops the lines of steps after the restored checkpoint (they will be redone)
    and a last line cut short by a kill. Returns the records kept."""
    if not self.enabled or not self.path.exists():
      return []
    kept = []
    with self.path.open("r") as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          # Only the last line can be cut short (each line is one write); the lines before it
          # are whole. Anything after a bad line belongs to steps that will be redone.
          break
        if record["step"] <= step:
          kept.append(record)
    paths.write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return kept

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **metrics}, sort_keys=True) + "\n"
    if self.remote:
      self.path.write_text((self.path.read_text() if self.path.exists() else "") + line)
    else:
      with self.path.open("a") as f:
        f.write(line)
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and np.isfinite(v):
        self.tb.add_scalar(k.replace("@", "_"), v, step)  # TensorBoard names allow no "@"
    self.tb.flush()
    self._sync_tb()

  def _sync_tb(self):
    """Copies the local TensorBoard event files of a remote workdir to <workdir>/tb."""
    if self._tb_local is not None:
      paths.copy_files(self._tb_local, self._tb_dir)

  def close(self):
    if self.tb is not None:
      self.tb.close()
      self.tb = None
      self._sync_tb()
    if self._tb_local is not None:
      shutil.rmtree(self._tb_local, ignore_errors=True)
      self._tb_local = None



def run_table(history: list[dict[str, Any]], result: dict[str, Any], seconds: float) -> str:
  """The end-of-run table: a few training steps, then accuracy against budget."""
  lines = [f"\n=== run finished in {seconds:.0f} s ===",
           f"{'step':>5} {'reward':>7} {'anytime':>8} {'final':>6} {'think_len':>9} "
           f"{'loss':>8} {'clip':>6} {'s/step':>7}"]
  pick = sorted({0, len(history) // 2, len(history) - 1}) if history else []
  for i in pick:
    h = history[i]
    lines.append(f"{h['step']:>5} {h['reward']:7.3f} {h['anytime_score']:8.3f} "
                 f"{h['final_accuracy']:6.3f} {h['thinking_len']:9.1f} {h['loss']:8.4f} "
                 f"{h.get('clip_frac', 0):6.3f} {h['seconds/step']:7.2f}")
  lines.append("\nevaluation:")
  lines.append(evaluation.budget_table(result))
  return "\n".join(lines)
