"""The flags are made from the config dataclasses (brpo/run/flags.py): one flag per field with
the field's default, every named flagfile parses, and a parse round-trips through to_dict."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import pytest
from absl import flags

from brpo.core import advantages as adv_lib
from brpo.core import loss as loss_lib
from brpo.run import config as C
from brpo.run.settings import flag_name
from brpo.run import flags as flags_lib
from conftest import ROOT
from models import tokenizer as tok_lib

# Flags today's flagfiles and scripts use whose name is not the field's.
RENAMED = {"train_data": ("data", "train"), "eval_data": ("data", "eval"),
           "lr_schedule": ("optim", "schedule"), "eval_budgets": ("eval", "n_budgets"),
           "eval_b_max": ("eval", "b_max"), "eval_samples": ("eval", "samples"),
           "eval_temperature": ("eval", "temperature"), "eval_top_p": ("eval", "top_p"),
           "eval_summary_len": ("eval", "summary_len"),
           "eval_periodic_size": ("eval", "periodic_size"),
           "eval_benchmarks": ("eval", "benchmarks")}
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.flags")))


def fresh() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags_lib.define_flags(fv)
  return fv


def test_one_flag_per_field_and_no_other():
  fv = fresh()
  by_flag = {flag_name(f): (group, f) for group, _, f in flags_lib.fields()}
  assert len(by_flag) == sum(1 for _ in flags_lib.fields())  # no two fields share a flag
  assert set(by_flag) == set(fv)  # no exclusions: every field has a flag and vice versa
  for name, (group, field) in by_flag.items():
    if name != field.name:
      assert RENAMED[name] == (group, field.name)
  assert {n for n, (_, f) in by_flag.items() if n != f.name} == set(RENAMED)
  # The removed field that nothing read.
  assert "log_every" not in {f.name for f in dataclasses.fields(C.RunConfig)}


def test_defaults_help_and_choices_come_from_the_fields():
  fv = fresh()
  for _, _, f in flags_lib.fields():
    flag = fv[flag_name(f)]
    default = list(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    assert flag.default == default, f.name
    assert flag.help.endswith(f.metadata["help"]), f.name
    if f.metadata["choices"] is not None:
      assert tuple(flag.parser.enum_values) == f.metadata["choices"]
  # Choices are the library's own tables.
  assert tuple(fv["thinking_baseline"].parser.enum_values) == adv_lib.BASELINES
  assert tuple(fv["loss_agg"].parser.enum_values) == loss_lib.AGGREGATIONS
  assert tuple(fv["template"].parser.enum_values) == tuple(tok_lib.TEMPLATES)
  # With no flags given, the config is the dataclasses' default.
  fv(["prog"])
  assert flags_lib.config_from_flags(fv) == C.ExperimentConfig()


def test_round_trip_flags_config_dict():
  args = ["--budgets=24,48,96", "--prior_weights=0.5,0.25,0.25", "--mesh=2,-1,1",
          "--noprogress", "--lr_schedule=cosine", "--eval_budgets=8", "--eval_top_p=0.9",
          "--kl_type=k1", "--loss_agg=token_mean", "--dtype=bfloat16", "--lam=0.25",
          "--train_data=arith:train:n=64", "--grader_timeout_s=2.5", "--mode=eval"]
  ec = flags_lib.config_from_args(args)
  assert (ec.rl.budgets, ec.rl.prior_weights, ec.run.mesh, ec.run.progress) == (
      (24, 48, 96), (0.5, 0.25, 0.25), (2, -1, 1), False)
  assert (ec.optim.schedule, ec.eval.n_budgets, ec.data.train) == ("cosine", 8,
                                                                    "arith:train:n=64")
  assert C.ExperimentConfig.from_dict(json.loads(ec.to_json())) == ec
  # Every field back as a flag: the same config.
  again = []
  for group, _, f in flags_lib.fields():
    value = ec.to_dict()[group][f.name]
    if isinstance(value, tuple):
      value = ",".join(map(str, value))
    again.append(f"--{flag_name(f)}={value}")
  assert flags_lib.config_from_args(again) == ec


def test_from_dict_drops_removed_settings():
  d = C.ExperimentConfig().to_dict()
  d["run"]["log_every"] = 1  # in configs saved before it was removed
  assert C.ExperimentConfig.from_dict(d) == C.ExperimentConfig()


def test_the_dataclasses_check_choices_too():
  with pytest.raises(ValueError, match=r"^--lr_schedule='step': must be one of constant, "
                                       r"cosine, linear$"):
    C.OptimConfig(schedule="step")
  with pytest.raises(ValueError, match=r"^--template='alpaca': must be one of r1_distill"):
    C.ModelSpec(template="alpaca")


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_each_flagfile_parses(path, monkeypatch):
  monkeypatch.chdir(ROOT)  # nested flagfiles are relative to the repository root
  ec = flags_lib.config_from_args([f"--flagfile={path}"])  # parses only: no data is read
  assert ec.run.workdir.startswith("workdir/")


def test_flagfile_errors_name_the_line(tmp_path, monkeypatch):
  (tmp_path / "a.flags").write_text("# comment\n// too\n\n--steps=3\n--flagfile=b.flags\n")
  (tmp_path / "b.flags").write_text("--seed=2\n  \n--nosuch=1\n")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError) as e:
    flags_lib.config_from_args(["--flagfile=a.flags"])
  assert str(e.value) == "b.flags:3: unknown flag --nosuch (--helpfull lists the flags)"
  (tmp_path / "b.flags").write_text("--flagfile=a.flags\n")
  with pytest.raises(ValueError, match=r"^b.flags:1: --flagfile=a.flags: includes itself$"):
    flags_lib.config_from_args(["--flagfile=a.flags"])
  with pytest.raises(ValueError, match=r"^unexpected arguments \['x'\]"):
    flags_lib.config_from_args(["--steps=2", "x"])


def test_flagfiles_relative_to_a_folder(tmp_path, monkeypatch):
  # As experiments/ablation.py reads the named runs, from any current directory.
  monkeypatch.chdir(tmp_path)
  grpo = "experiments/configs/grpo.flags"  # includes tiny_cpu.flags by a relative path
  ec = flags_lib.config_from_args([f"--flagfile={grpo}"], relative_to=ROOT)
  monkeypatch.chdir(ROOT)
  assert ec == flags_lib.config_from_args([f"--flagfile={grpo}"])
  with pytest.raises(ValueError, match=rf"^--flagfile=nope.flags: no such file or directory "
                                       rf"\(relative to {ROOT}\)$"):
    flags_lib.config_from_args(["--flagfile=nope.flags"], relative_to=ROOT)
