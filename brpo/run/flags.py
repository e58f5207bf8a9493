"""Command-line flags made from the config dataclasses of brpo/run/config.py.

Each config field is one flag: its name (the field's, or `flag` in the field's metadata), type,
default, help and choices all come from the field, so a setting is written once. The library
never reads flags: these functions take the FlagValues to fill or read, and entry points
(experiments/gsm_math.py) call them.

  fv = flags.FlagValues(); define_flags(fv); parse(fv, argv); ec = config_from_flags(fv)
  ec = config_from_args(["--flagfile=experiments/configs/grpo.flags", "--steps=2"])
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Iterator, Sequence

from absl import flags

from brpo.run import config as C
from brpo.run.settings import flag_name


def fields() -> Iterator[tuple[str, type, dataclasses.Field]]:
  """(group, its dataclass, field) for every field of ExperimentConfig, in order."""
  for group, cls in C.GROUPS.items():
    for f in dataclasses.fields(cls):
      yield group, cls, f


def _element_type(cls: type, f: dataclasses.Field) -> type | None:
  """int or float for a tuple field (a list flag), None for a scalar field."""
  hint = typing.get_type_hints(cls)[f.name]
  if typing.get_origin(hint) is tuple:
    return typing.get_args(hint)[0]
  return None


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines one flag per config field in `flag_values`."""
  for _, cls, f in fields():
    name, help_ = flag_name(f), f.metadata["help"]
    choices, hint = f.metadata.get("choices"), typing.get_type_hints(cls)[f.name]
    if choices is not None:
      flags.DEFINE_enum(name, f.default, list(choices), help_, flag_values=flag_values)
    elif _element_type(cls, f) is not None:
      flags.DEFINE_list(name, [str(x) for x in f.default], help_, flag_values=flag_values)
    else:
      define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
                str: flags.DEFINE_string}[hint]
      define(name, f.default, help_, flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues) -> C.ExperimentConfig:
  """Parsed flags -> the frozen ExperimentConfig (raises ValueError naming a flag)."""
  groups: dict[str, dict[str, Any]] = {group: {} for group in C.GROUPS}
  for group, cls, f in fields():
    name = flag_name(f)
    value = flag_values[name].value
    element = _element_type(cls, f)
    if element is not None:
      try:
        value = tuple(element(v) for v in value)
      except ValueError:
        what = "integers" if element is int else "numbers"
        raise ValueError(f"--{name}={','.join(value)}: expected {what}") from None
    groups[group][f.name] = value
  return C.ExperimentConfig(**{group: C.GROUPS[group](**kwargs)
                               for group, kwargs in groups.items()})


def _expand(args: Sequence[str], relative_to: str | None, origin: str = "",
            stack: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
  """(argument, origin) for each argument, every --flagfile replaced by its lines as absl reads
  them (blank lines and lines starting with # or // skipped; relative paths from `relative_to`,
  default the current directory), each with "path:line" as its origin ("" on the command line).
  Raises ValueError for a flagfile that cannot be read, naming where it was given."""
  args = list(args)
  while args:
    arg, args = args[0], args[1:]
    if arg in ("--flagfile", "-flagfile") and args and not origin:  # --flagfile PATH
      arg, args = f"--flagfile={args[0]}", args[1:]
    if not arg.startswith(("--flagfile=", "-flagfile=")):
      yield arg, origin
      if arg == "--":
        yield from ((a, origin) for a in args)
        return
      continue
    path = os.path.expanduser(arg.split("=", 1)[1].strip())
    where = f"{origin}: " if origin else ""
    if path in stack:
      raise ValueError(f"{where}--flagfile={path}: includes itself")
    try:
      with open(os.path.join(relative_to or "", path)) as f:
        lines = f.readlines()
    except OSError as e:
      hint = "" if os.path.isabs(path) else (
          f" (relative to {relative_to})" if relative_to else
          f" (relative to the current directory {os.getcwd()}; run from the repository root)")
      raise ValueError(f"{where}--flagfile={path}: {e.strerror.lower()}{hint}") from None
    for n, line in enumerate(lines, start=1):
      if not line.isspace() and not line.startswith(("#", "//")):
        yield from _expand([line.strip()], relative_to, f"{path}:{n}", (*stack, path))


def parse(flag_values: flags.FlagValues, argv: Sequence[str],
          relative_to: str | None = None) -> list[str]:
  """flag_values(argv) with one-line errors: raises ValueError naming the flag and, for one set
  in a flagfile, the file and line. Returns the arguments that are not flags (argv[0] first).
  Flagfiles named by a relative path are read from `relative_to` (default: the current
  directory, as absl does)."""
  expanded = list(_expand(argv[1:], relative_to))
  args = [arg for arg, _ in expanded]
  try:
    return flag_values([argv[0], *args])
  except flags.Error as e:
    error = e
  # The argument at fault: the first whose prefix of the arguments fails the same way.
  origin = ""
  for i in range(len(args) + 1):
    flag_values.unparse_flags()
    try:
      flag_values([argv[0], *args[:i]])
    except flags.Error as e:
      if str(e) == str(error):
        origin = f"{expanded[i - 1][1]}: " if i and expanded[i - 1][1] else ""
        break
  flag_values.unparse_flags()
  if isinstance(error, flags.UnrecognizedFlagError):
    hint = "--helpfull lists the flags"
    if "Did you mean:" in str(error):  # absl keeps its suggestions in the message only
      names = str(error).split("Did you mean:", 1)[1].strip(" ?").split(",")
      hint = "did you mean " + ", ".join(f"--{n.strip()}" for n in names) + "?"
    raise ValueError(f"{origin}unknown flag --{error.flagname} ({hint})") from None
  raise ValueError(origin + " ".join(str(error).split())) from None


def config_from_args(args: Sequence[str], relative_to: str | None = None) -> C.ExperimentConfig:
  """Flags (e.g. ["--flagfile=experiments/configs/grpo.flags", "--steps=2"]) -> config, parsed
  into fresh FlagValues (so from the defaults). For scripts and tests that build several runs;
  `relative_to`: as for parse (other relative paths, e.g. --workdir, stay as they are).
  Raises ValueError (one line naming the flag, and the flagfile line where it is set)."""
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  rest = parse(flag_values, ["brpo", *args], relative_to)
  if len(rest) > 1:
    raise ValueError(f"unexpected arguments {rest[1:]} (flags start with --)")
  return config_from_flags(flag_values)
