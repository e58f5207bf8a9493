"""One-step end-to-end runs of every tiny flagfile (experiments/configs/), in process, with the
shared 20-step warm start and tiny sizes: config parsed, rollout, grading, update, checkpoint,
metrics, evaluation and plot written. Then --mode=eval on a finished workdir."""

from __future__ import annotations

import json
import os

import pytest

from brpo.run import runner
from conftest import ROOT, WARMSTART_STEPS
from experiments import gsm_math

TINY_RUNS = ("tiny_cpu", "grpo", "grpo_linear", "grpo_decouple", "grpo_vr", "ar_base",
             "ar_linear", "ar_uniform")
# What each flagfile must set (SPEC §8): (budgets, prior, A, thinking baseline, summary adv.).
EXPECTED = {
    "tiny_cpu": (4, "uniform", 4, "brpo", "decoupled"),
    "grpo": (1, "base", 1, "v2only", "grpo"),
    "grpo_linear": (4, "linear", 1, "v2only", "grpo"),
    "grpo_decouple": (4, "base", 4, "v2only", "decoupled"),
    "grpo_vr": (4, "base", 1, "brpo", "grpo"),
    "ar_base": (4, "base", 4, "brpo", "decoupled"),
    "ar_linear": (4, "linear", 4, "brpo", "decoupled"),
    "ar_uniform": (4, "uniform", 4, "brpo", "decoupled"),
}


def small(name: str, workdir, warmstart_dir, *extra: str) -> list[str]:
  return [f"--flagfile={ROOT}/experiments/configs/{name}.flags", f"--workdir={workdir}",
          f"--warmstart_dir={warmstart_dir}", f"--warmstart_steps={WARMSTART_STEPS}",
          "--steps=1", "--prompts_per_batch=2", "--mini_batch_prompts=2", "--group_size=2",
          "--b_max=24", "--eval_size=4", "--eval_budgets=2", "--checkpoint_every=1",
          # 4 rows per update split over fsdp = 4 (rows that do not divide the mesh are an error)
          "--mesh=1,4,2", "--progress=false", *extra]


@pytest.mark.parametrize("name", TINY_RUNS)
def test_tiny_flagfile_runs_end_to_end(name, tmp_path, tiny_warmstart_dir):
  ec = gsm_math.config_from_args(small(name, tmp_path, tiny_warmstart_dir))
  n_budgets, prior, a, baseline, summary_adv = EXPECTED[name]
  assert (len(ec.rl.budget_spec.budgets), ec.rl.prior, ec.rl.n_summaries,
          ec.rl.thinking_baseline, ec.rl.summary_advantage) == EXPECTED[name]
  result = runner.main(ec)
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1]
  for b in ec.rl.budget_spec.budgets:
    assert 0.0 <= records[0][f"accuracy@{b}"] <= 1.0
  assert records[0]["generated_tokens"] > 0 and records[0]["bad_updates"] == 0
  with open(tmp_path / "eval.json") as f:
    saved = json.load(f)
  assert saved["budgets"] == result["budgets"] == [12, 24]
  assert saved["n_questions"] == 4
  assert os.path.getsize(tmp_path / "accuracy.png") > 1000
  assert os.path.isdir(tmp_path / "checkpoints" / "1")
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["rl"]["prior"] == prior


def test_eval_mode_reads_the_checkpoint(tmp_path, tiny_warmstart_dir):
  runner.main(gsm_math.config_from_args(small("ar_uniform", tmp_path, tiny_warmstart_dir)))
  os.remove(tmp_path / "eval.json")
  result = runner.main(gsm_math.config_from_args(
      small("ar_uniform", tmp_path, tiny_warmstart_dir, "--mode=eval")))
  assert result["step"] == 1
  assert os.path.exists(tmp_path / "eval.json")


def test_benchmarks_mode_prints_the_paper_table(tmp_path, tiny_warmstart_dir, capsys):
  """--mode=benchmarks: every set evaluated with one model, one JSON and plot per set, and the
  paper's table (anytime and final per benchmark, and their average)."""
  sets = "--eval_benchmarks=easy=arith:test:n=4,hard=arith:val:n=4"
  ec = gsm_math.config_from_args(small("ar_uniform", tmp_path, tiny_warmstart_dir,
                                       "--mode=benchmarks", sets))
  summary = runner.main(ec)
  assert list(summary["benchmarks"]) == ["easy", "hard"]
  table = capsys.readouterr().out.strip().splitlines()[-3:]
  assert table[0].split() == ["easy", "hard", "Avg"]
  for line, key in zip(table[1:], ("anytime_score", "final_accuracy")):
    label, *values = line.split()
    want = [100 * summary["benchmarks"][n][key] for n in ("easy", "hard")]
    assert [float(v) for v in values] == pytest.approx(
        [round(w, 1) for w in want] + [round(sum(want) / 2, 1)], abs=0.051)
  for name in ("easy", "hard"):
    with open(tmp_path / f"eval_{name}.json") as f:
      assert json.load(f)["n_questions"] == 4
    assert os.path.getsize(tmp_path / f"accuracy_{name}.png") > 1000
  with open(tmp_path / "benchmarks.json") as f:
    assert json.load(f)["average"] == summary["average"]
  with pytest.raises(ValueError, match="--eval_benchmarks: 'oops' is not name=file"):
    gsm_math.config_from_args(small("ar_uniform", tmp_path, tiny_warmstart_dir,
                                    "--eval_benchmarks=oops"))


def test_rollout_in_chunks_on_the_mesh(tmp_path, tiny_warmstart_dir):
  """--rollout_batch / --compact_every through a whole step on the 8-device mesh: the same
  thinkings and rewards whatever the chunk size (per-row keys)."""
  records = []
  for i, extra in enumerate((["--rollout_batch=2"], ["--rollout_batch=4", "--compact_every=4"])):
    workdir = tmp_path / str(i)
    runner.main(gsm_math.config_from_args(small("ar_uniform", workdir, tiny_warmstart_dir,
                                                "--eval_size=2", *extra)))
    with open(workdir / "metrics.jsonl") as f:
      records.append(json.loads(f.readline()))
  for key in ("thinking_len", "reward", "generated_tokens", "frac_think_end"):
    assert records[0][key] == records[1][key], key


def test_compare_runs_finds_the_first_differing_step(tmp_path):
  from experiments import compare_runs

  def write(name, rewards, acc):
    d = tmp_path / name
    d.mkdir()
    with open(d / "metrics.jsonl", "w") as f:
      for step, r in enumerate(rewards, 1):
        f.write(json.dumps({"step": step, "reward": r, "seconds/step": step * 0.1 + len(name)})
                + "\n")
    with open(d / "eval.json", "w") as f:
      json.dump({"anytime_score": acc}, f)
    return str(d)

  a, b, c = write("a", [0.1, 0.2, 0.3], 0.5), write("bb", [0.1, 0.2, 0.3], 0.5), \
      write("c", [0.1, 0.25, 0.3], 0.6)
  assert compare_runs.compare(a, b) == (True, ["metrics.jsonl: 3 of 3 steps equal (timing "
                                               "fields left out)", "eval.json: equal"])
  same, lines = compare_runs.compare(a, c)
  assert not same and lines == ["first differing step 2: reward 0.2 vs 0.25",
                                "eval.json: different"]
