"""The quickstart notebook: experiments/quickstart.ipynb (Colab) is generated from
experiments/quickstart.py and kept in sync; its cells run top to bottom on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, WARMSTART_STEPS

from experiments import make_notebook

SOURCE = os.path.join(ROOT, "experiments", "quickstart.py")
NOTEBOOK = os.path.join(ROOT, "experiments", "quickstart.ipynb")

# Runs the notebook's code cells in one namespace, as Jupyter would (no __file__), skipping the
# Colab install cell.
RUN_CELLS = """
import json, sys
nb = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for cell in nb["cells"]:
  if cell["cell_type"] == "code" and "install" not in cell["metadata"].get("tags", []):
    exec(compile("".join(cell["source"]), "<cell>", "exec"), ns)
"""


def test_notebook_is_generated_from_the_script():
  with open(SOURCE, encoding="utf-8") as f:
    want = make_notebook.render(f.read())
  with open(NOTEBOOK, encoding="utf-8") as f:
    assert f.read() == want, "run: python experiments/make_notebook.py"
  nb = json.loads(want)
  kinds = [c["cell_type"] for c in nb["cells"]]
  assert kinds.count("code") >= 5 and kinds.count("markdown") >= 4
  assert nb["cells"][1]["metadata"]["tags"] == ["install"]
  assert "Change runtime type" in "".join(nb["cells"][1]["source"])


def test_notebook_cells_run_top_to_bottom(tmp_path, tiny_warmstart_dir):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "QUICKSTART_QUESTIONS": "8",
         "QUICKSTART_OUT": str(tmp_path),
         "QUICKSTART_FLAGS": f"--warmstart_dir={tiny_warmstart_dir} "
                             f"--warmstart_steps={WARMSTART_STEPS}"}
  proc = subprocess.run([sys.executable, "-c", RUN_CELLS, NOTEBOOK], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert out.count("\n=== ") == 3 and out.count("--- budget ") == 12, out[-3000:]
  assert "anytime score" in out.lower(), out[-2000:]
  assert os.path.getsize(tmp_path / "quickstart_accuracy.png") > 1000
