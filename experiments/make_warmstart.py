"""Makes the tiny task's supervised warm start that the default run starts RL from.

  python experiments/make_warmstart.py [--out=experiments/warmstarts/tiny_arith]
                                       [--flagfile=experiments/configs/tiny_cpu.flags] [--flag=...]

The repository ships the result in experiments/warmstarts/tiny_arith (1.3 MB: orbax params, the
task's sentencepiece model, warmstart.json with the settings and the held-out checks), and
tiny_cpu.flags reads it, so every machine starts RL from the same bits: trained anew, the warm
start rounds differently on every CPU kind (README, "How far these numbers move"). This command
remakes it from the flagfile's settings (`brpo.tasks.arith.warmstart.WarmStartConfig`, the eval
set the training questions are deduplicated against), into a folder that must not hold one yet;
tests/test_warmstart.py checks that a remade one is equivalent to the shipped one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

from absl import app, flags

from brpo.run import flags as flags_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = "experiments/warmstarts/tiny_arith"

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This script's flags; defined when it runs, so that importing `make` defines none (the
  test imports it beside other scripts' flags)."""
  flags.DEFINE_string("out", SHIPPED, "Folder to write (relative: to the repository root).")
  flags.DEFINE_string("flagfile_of_run", "experiments/configs/tiny_cpu.flags",
                      "The run whose warm start to make (its --model, --train_data, "
                      "--eval_data, --warmstart_* flags decide it).")
  flags.DEFINE_list("extra", [], "More flags of that run, e.g. --extra=--warmstart_seed=1.")


def make(out: str, flagfile: str = "experiments/configs/tiny_cpu.flags",
         extra: Sequence[str] = (), progress: bool = True) -> dict:
  """Trains the warm start of `flagfile`'s run into `out` -> its warmstart.json document."""
  from brpo.run import loading
  from brpo.tasks import data as data_lib
  from brpo.tasks.arith import warmstart

  if os.path.exists(os.path.join(out, warmstart.SETTINGS_FILE)):
    raise ValueError(f"--out={out}: holds a warm start already; delete it or choose another "
                     "folder")
  ec = flags_lib.config_from_args(
      [f"--flagfile={flagfile}", f"--warmstart_dir={out}", f"--progress={progress}",
       *[f"--{e.lstrip('-')}" for e in extra]], relative_to=ROOT)
  # The run deduplicates the warm start's training questions against its eval set: the same here.
  eval_examples = data_lib.load_dataset(ec.data.path(ec.data.eval), ec.data.on_bad_record)
  if ec.data.eval_size:
    eval_examples = eval_examples[:ec.data.eval_size]
  loading.load_model(ec, eval_examples)
  with open(os.path.join(out, warmstart.SETTINGS_FILE)) as f:
    return json.load(f)


def main(argv: Sequence[str]) -> None:
  del argv
  out = os.path.join(ROOT, FLAGS.out)
  t = time.time()
  try:
    doc = make(out, FLAGS.flagfile_of_run, FLAGS.extra)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"make_warmstart.py: error: {e}")
  checks = ", ".join(f"{s}: {a:.3f}" for s, a in doc["results"].get("checks", []))
  print(f"warm start in {out}: {doc['results']['steps_run']} steps in {time.time() - t:.0f} s; "
        f"held-out greedy accuracy at {doc['warm_start']['check_budget']} tokens by step: "
        f"{checks or '(no checks)'}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
