"""Anytime-reasoning RL (BRPO) on math data: the researcher's front door.

  python experiments/gsm_math.py --flagfile=experiments/configs/tiny_cpu.flags [--flag=value ...]

The flags are made from the config dataclasses (brpo/run/config.py, brpo/run/flags.py), parsed
once into the frozen ExperimentConfig and handed to brpo.run.runner; the library never reads
flags. Every flag can be overridden after the flagfile.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from absl import app, flags

from brpo.run import flags as flags_lib

FLAGS = flags.FLAGS
flags_lib.define_flags(FLAGS)
flags.adopt_module_key_flags(flags_lib)  # --help lists them, as flags of this script

# For scripts and tests that build several runs (fresh flags each call).
config_from_args = flags_lib.config_from_args


def _fail(message: str) -> NoReturn:
  # One line on stderr, the last one, whatever the message held.
  sys.exit(f"gsm_math.py: error: {' '.join(message.split())}")


def _flags_parser(argv: list[str]) -> list[str]:
  try:
    return flags_lib.parse(FLAGS, argv)
  except ValueError as e:
    _fail(str(e))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]} (flags start with --)")
  try:
    ec = flags_lib.config_from_flags(FLAGS)
  except ValueError as e:
    _fail(str(e))
  from brpo.run import runner

  try:
    runner.main(ec)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    if os.environ.get("BRPO_DEBUG"):
      raise
    _fail(f"{e} (BRPO_DEBUG=1 shows the traceback)")


if __name__ == "__main__":
  app.run(main, flags_parser=_flags_parser)
