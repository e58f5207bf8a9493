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


def test_default_spread_reads_finished_runs_and_summarizes(tmp_path):
  """experiments/default_spread.py: a perturbation whose eval.json exists is read back, not rerun;
  summary.json holds each run and the mean and range of both figures."""
  from experiments import default_spread

  figures = {"avx2_cap": (0.60, 0.80), "ynn_off": (0.64, 0.90), "ulp_up": (0.62, 0.85)}
  for name, (anytime, final) in figures.items():
    (tmp_path / name).mkdir()
    with open(tmp_path / name / "eval.json", "w") as f:
      json.dump({"anytime_score": anytime, "final_accuracy": final, "accuracy": [final],
                 "mean_thinking_tokens": 20.0}, f)
  runs = {name: default_spread.run_one(name, str(tmp_path), []) for name in figures}
  summary = default_spread.summarize(runs, [])
  assert [r["perturbation"] for r in summary["runs"]] == list(figures)
  assert summary["runs"][1]["xla_flags"].endswith("--xla_cpu_experimental_ynn_fusion_type=")
  assert summary["runs"][2]["init_ulp"] == 1
  assert summary["anytime_mean"] == pytest.approx(0.62)
  assert (summary["anytime_min"], summary["anytime_max"]) == (0.60, 0.64)
  assert summary["final_mean"] == pytest.approx(0.85)
  assert (summary["final_min"], summary["final_max"]) == (0.80, 0.90)
  assert summary["final_max_dev"] == pytest.approx(0.05)
  assert summary["distinct_runs"] == 3 and not any("same_bits_as" in r for r in summary["runs"])
  runs["no_cap"] = dict(runs["avx2_cap"])  # the same bits: marked, and not a distinct run
  runs["ulp_down"] = dict(runs["avx2_cap"], train_losses=[-0.1])  # only the training differs
  summary = default_spread.summarize(runs, [])
  assert summary["runs"][3]["same_bits_as"] == "avx2_cap" and summary["distinct_runs"] == 4
  assert "same_bits_as" not in summary["runs"][4]


def test_init_ulp_moves_every_float_parameter_by_ulps():
  import jax.numpy as jnp
  import numpy as np

  from brpo.run.loading import nudge_ulps

  params = {"w": jnp.array([1.0, -2.5, 0.0, 3e-8], jnp.float32),
            "b": jnp.array([1.0, -1.0], jnp.bfloat16), "steps": jnp.array([3], jnp.int32)}
  up, down2 = nudge_ulps(params, 1), nudge_ulps(params, -2)
  w = np.asarray(params["w"])
  np.testing.assert_array_equal(np.asarray(up["w"]), np.nextafter(w, np.float32(np.inf)))
  once = np.nextafter(w, np.float32(-np.inf))
  np.testing.assert_array_equal(np.asarray(down2["w"]), np.nextafter(once, np.float32(-np.inf)))
  assert up["b"].dtype == jnp.bfloat16 and bool(jnp.all(up["b"] > params["b"]))
  assert bool(jnp.all(up["b"].astype(jnp.float32) - params["b"].astype(jnp.float32)
                      <= jnp.array([2 ** -7, 2 ** -7])))
  np.testing.assert_array_equal(np.asarray(up["steps"]), [3])


def test_eval_writes_graded_samples_beside_eval_json(tmp_path, tiny_warmstart_dir):
  """<name>_samples.jsonl beside every <name>.json (training, --mode=eval, --mode=benchmarks):
  the first questions at every budget with the texts the grader read; grading those texts again
  gives each line's grade, and the grades agree with the JSON's accuracy at that budget."""
  from brpo import grading
  from brpo.run import evaluation

  def check(name, result):
    assert "examples" not in result
    with open(tmp_path / f"{name}.json") as f:
      saved = json.load(f)
    assert "examples" not in saved
    with open(tmp_path / f"{name}_samples.jsonl") as f:
      lines = [json.loads(line) for line in f]
    n = saved["n_questions"]
    shown = min(evaluation.EXAMPLES_PER_BUDGET, n)
    assert [(e["budget"], e["question_index"]) for e in lines] == [
        (b, q) for b in saved["budgets"] for q in range(shown)]
    for e in lines:
      for key in ("question", "reference", "thinking", "summary"):
        assert isinstance(e[key], str) and e[key], key
      assert e["summary"].startswith(grading.SUMMARY_PREFIX)
      assert isinstance(e["format_ok"], bool) and isinstance(e["eos_cut"], bool)
      assert 0 < e["thinking_tokens"] <= e["budget"] and e["grade"] in (0.0, 1.0)
      assert e["extracted_answer"] == grading.extract_answer(e["summary"])
      assert grading.score(e["thinking"], e["summary"], e["reference"], e["eos_cut"]) == e["grade"]
    for b, acc in zip(saved["budgets"], saved["accuracy"]):  # samples=1: one row per question
      correct = sum(e["grade"] for e in lines if e["budget"] == b)
      assert acc * n - (n - shown) - 1e-6 <= correct <= acc * n + 1e-6, (b, acc, correct)
    # The same question text at every budget, one thinking cut at growing budgets.
    for q in range(shown):
      mine = [e for e in lines if e["question_index"] == q]
      assert len({e["question"] for e in mine}) == 1
      assert [e["thinking_tokens"] for e in mine] == sorted(e["thinking_tokens"] for e in mine)
    return lines

  check("eval", runner.main(gsm_math.config_from_args(
      small("ar_uniform", tmp_path, tiny_warmstart_dir))))
  os.remove(tmp_path / "eval_samples.jsonl")
  check("eval", runner.main(gsm_math.config_from_args(
      small("ar_uniform", tmp_path, tiny_warmstart_dir, "--mode=eval"))))
  summary = runner.main(gsm_math.config_from_args(small(
      "ar_uniform", tmp_path, tiny_warmstart_dir, "--mode=benchmarks",
      "--eval_benchmarks=easy=arith:test:n=4")))
  check("eval_easy", summary["benchmarks"]["easy"])
  with open(tmp_path / "benchmarks.json") as f:
    assert "examples" not in json.load(f)["benchmarks"]["easy"]
