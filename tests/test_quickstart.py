"""The quickstart notebook: experiments/quickstart.ipynb (Colab) is generated from
experiments/quickstart.py and kept in sync; it runs top to bottom in a Jupyter kernel on CPU."""

from __future__ import annotations

import base64
import json
import os

import nbclient
import nbformat
import pytest
from conftest import ROOT, WARMSTART_STEPS

from experiments import make_notebook

SOURCE = os.path.join(ROOT, "experiments", "quickstart.py")
NOTEBOOK = os.path.join(ROOT, "experiments", "quickstart.ipynb")


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


@pytest.mark.slow
def test_notebook_runs_in_a_jupyter_kernel_from_its_folder(tmp_path, monkeypatch,
                                                          tiny_warmstart_dir):
  """All cells, the install cell too (a no-op outside Colab), in a real "python3" kernel whose
  working directory is experiments/, as Jupyter runs a notebook; the plot is shown inline."""
  # The kernel inherits this environment: 8 questions and the shared 20-step warm start instead
  # of the notebook's 64 and full warm start; the same cells and outputs otherwise.
  monkeypatch.setenv("QUICKSTART_QUESTIONS", "8")
  monkeypatch.setenv("QUICKSTART_OUT", str(tmp_path))
  monkeypatch.setenv("QUICKSTART_FLAGS", f"--warmstart_dir={tiny_warmstart_dir} "
                                         f"--warmstart_steps={WARMSTART_STEPS}")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
                          kernel_name="python3").execute()  # raises on a failing cell
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  out = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert out.count("\n=== ") == 3 and out.count("--- budget ") == 12, out[-3000:]
  assert "anytime score" in out.lower(), out[-2000:]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 1, [o.output_type for o in outputs]
  png = base64.b64decode(images[0]["data"]["image/png"])
  with open(tmp_path / "quickstart_accuracy.png", "rb") as f:
    assert png == f.read() and png.startswith(b"\x89PNG")
