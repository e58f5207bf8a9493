"""experiments/quickstart.py (the Colab notebook, jupytext percent form) runs top to bottom."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, WARMSTART_STEPS

NOTEBOOK = os.path.join(ROOT, "experiments", "quickstart.py")


def test_notebook_cells_are_marked():
  with open(NOTEBOOK) as f:
    text = f.read()
  assert text.count("# %%") >= 8 and "# %% [markdown]" in text


def test_quickstart_runs_top_to_bottom(tmp_path, tiny_warmstart_dir):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "QUICKSTART_QUESTIONS": "8",
         "QUICKSTART_OUT": str(tmp_path),
         "QUICKSTART_FLAGS": f"--warmstart_dir={tiny_warmstart_dir} "
                             f"--warmstart_steps={WARMSTART_STEPS}"}
  proc = subprocess.run([sys.executable, NOTEBOOK], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert out.count("\n=== ") == 3 and out.count("--- budget ") == 12, out[-3000:]
  assert "anytime score" in out.lower(), out[-2000:]
  assert os.path.getsize(tmp_path / "quickstart_accuracy.png") > 1000
