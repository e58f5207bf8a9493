"""Writes experiments/quickstart.ipynb (the Colab notebook) from experiments/quickstart.py.

  python experiments/make_notebook.py

The .py file, in "percent" form (`# %%` code cells, `# %% [markdown]` text cells), is the
source; the notebook adds one install cell at the top. tests/test_quickstart.py checks that the
committed notebook is what this writes, and runs it in a Jupyter kernel from its own folder.
"""

from __future__ import annotations

import json
import os
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "experiments", "quickstart.py")
NOTEBOOK = os.path.join(ROOT, "experiments", "quickstart.ipynb")
INSTALL_TAG = "install"

INSTALL = """\
# Colab: pick the runtime first (Runtime > Change runtime type). CPU runs the tiny model; on a
# GPU runtime this installs jax with CUDA (the "gpu" extra), on a TPU runtime jax for TPU.
# Set REPO to this repository's git URL. Locally, skip this cell and open the notebook in Jupyter
# with the project installed (./run.sh does that); the next cell finds the repository root.
import os, subprocess, sys
REPO = os.environ.get("BRPO_REPO", "")
if "google.colab" in sys.modules and not os.path.exists("brpo"):
  if not REPO:
    raise SystemExit("set REPO to the repository's git URL")
  subprocess.run(["git", "clone", "-q", REPO, "anytime-brpo"], check=True)
  os.chdir("anytime-brpo")
  extra = ("[gpu]" if os.environ.get("COLAB_GPU") else
           "[tpu]" if os.environ.get("COLAB_TPU_ADDR") else "")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt",
                  "-e", "." + extra], check=True)
"""


def cells(text: str) -> list[tuple[str, str]]:
  """Percent-form source -> [(kind, source)], kind "code" or "markdown" (its "# " removed)."""
  out: list[tuple[str, list[str]]] = []
  for line in text.splitlines():
    if line.startswith("# %%"):
      out.append(("markdown" if "[markdown]" in line else "code", []))
    elif out:
      out[-1][1].append(line)
  result = []
  for kind, lines in out:
    while lines and not lines[-1].strip():
      lines.pop()
    if kind == "markdown":
      lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
    result.append((kind, "\n".join(lines)))
  return result


def notebook(text: str) -> dict[str, Any]:
  """The .ipynb document (nbformat 4) for percent-form `text`, with the install cell first."""

  def cell(kind: str, source: str, tags=()) -> dict[str, Any]:
    lines = source.splitlines(keepends=True)
    c: dict[str, Any] = {"cell_type": kind, "metadata": {"tags": list(tags)} if tags else {},
                         "source": lines}
    if kind == "code":
      c.update(execution_count=None, outputs=[])
    return c

  body = [cell(kind, source) for kind, source in cells(text)]
  return {"cells": [body[0], cell("code", INSTALL, [INSTALL_TAG]), *body[1:]],
          "metadata": {"accelerator": "None", "colab": {"provenance": []},
                       "kernelspec": {"display_name": "Python 3", "name": "python3"},
                       "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 4}


def render(text: str) -> str:
  return json.dumps(notebook(text), indent=1, ensure_ascii=False) + "\n"


def main() -> None:
  with open(SOURCE, encoding="utf-8") as f:
    out = render(f.read())
  with open(NOTEBOOK, "w", encoding="utf-8") as f:
    f.write(out)
  print(NOTEBOOK)


if __name__ == "__main__":
  main()
