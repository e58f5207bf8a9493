"""What a run writes as it goes: metrics.jsonl (one JSON object per RL step), TensorBoard
scalars, and the end-of-run table.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from brpo.run import evaluation


class MetricsWriter:
  """metrics.jsonl (one JSON object per step) and a TensorBoard writer; process 0 only.

  `resume_step`: the step of the checkpoint a resumed run restored. TensorBoard then drops the
  earlier files' events from that step on (they will be redone); call `truncate_after` for the
  JSONL file.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(os.path.join(workdir, "tb"),
                              purge_step=None if resume_step is None else resume_step + 1)

  def truncate_after(self, step: int) -> list[dict[str, Any]]:
    """On resume: drops the lines of steps after the restored checkpoint (they will be redone)
    and a last line cut short by a kill. Returns the records kept."""
    if not self.enabled or not os.path.exists(self.path):
      return []
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          # Only the last line can be cut short (each line is one write); the lines before it
          # are whole. Anything after a bad line belongs to steps that will be redone.
          break
        if record["step"] <= step:
          kept.append(record)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    os.replace(tmp, self.path)
    return kept

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and np.isfinite(v):
        self.tb.add_scalar(k.replace("@", "_"), v, step)  # TensorBoard names allow no "@"
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()



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
