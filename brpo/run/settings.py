"""The pieces brpo/run/config.py builds its dataclasses from: the allowed values of its enum
settings, and `setting`, a dataclass field that carries its command-line flag's name, help and
choices (brpo/run/flags.py makes the flags from these)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

SUMMARY_ADVANTAGES = ("decoupled", "grpo")
INITS = ("warmstart", "random", "checkpoint")
OLD_LOGP = ("recompute", "sampler")
DTYPES = ("float32", "bfloat16")
LONG_PROMPTS = ("skip", "error")
SCHEDULES = ("constant", "cosine", "linear")
MODES = ("train", "eval", "benchmarks")
# The paper's five evaluation sets (SPEC §10) as prepare_data.py writes them under --data_dir.
PAPER_BENCHMARKS = ("aime=anytime_eval/aime.json,amc=anytime_eval/amc.json,"
                    "math500=anytime_eval/math.json,minerva=anytime_eval/minerva.json,"
                    "olympiad=anytime_eval/olympiad_bench.json")
DISTRIBUTED = ("auto", "on", "off")


def setting(default: Any, help: str, *, flag: str | None = None,
            choices: Sequence[str] | None = None) -> Any:
  """A config field and its command-line flag (brpo/run/flags.py makes the flags from these).

  help: the flag's help. flag: the flag's name where it is not the field's (kept so that
  flagfiles keep working). choices: the allowed values (an enum flag; checked here too).
  """
  return dataclasses.field(default=default, metadata={
      "help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None})


def flag_name(field: dataclasses.Field) -> str:
  """The command-line name of a config field (error messages name the flag)."""
  return field.metadata.get("flag") or field.name


def check_choices(cfg: Any) -> None:
  """Raises ValueError naming the flag of a field of `cfg` whose value is not one of its choices."""
  for f in dataclasses.fields(cfg):
    choices = f.metadata.get("choices")
    if choices is not None and getattr(cfg, f.name) not in choices:
      raise ValueError(f"--{flag_name(f)}={getattr(cfg, f.name)!r}: must be one of "
                       f"{', '.join(choices)}")
