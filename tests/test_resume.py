"""Reliability of whole runs: a run killed and restarted equals one never stopped; leftovers of a
kill (an unfinished checkpoint folder, a half-written metrics line) are cleaned up; a run whose
updates are all non-finite stops with a one-line error and never checkpoints bad parameters.

Every run is experiments/gsm_math.py in a subprocess (tests/run_helpers.py: the tiny task on a
(1, 4, 2) mesh of 8 CPU devices with a deterministic stand-in grader, so that groups get mixed
rewards and the updates are not zero).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import time

import pytest

import run_helpers as rh
from run_helpers import assert_same_run, checkpoint_steps, finish, start


def _saving(workdir) -> bool:
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))


# When to kill: as soon as checkpoint 1 is complete (the run is then in step 2's rollout), or,
# after that, as soon as checkpoint 2's unfinished folder appears (mid-save; should the poll miss
# the save's short window, once checkpoint 2 is complete instead).
KILL_POINTS = {
    "rollout": lambda w: bool(checkpoint_steps(w)),
    "save": lambda w: bool(checkpoint_steps(w)) and (_saving(w) or len(checkpoint_steps(w)) >= 2),
}


@pytest.mark.parametrize("when", sorted(KILL_POINTS))
def test_killed_run_resumes_to_the_uninterrupted_result(when, tmp_path, tiny_warmstart_dir,
                                                        uninterrupted):
  workdir = tmp_path / "killed"
  proc = start(workdir, tiny_warmstart_dir)
  # SIGKILL: no handler runs, nothing is flushed.
  deadline = time.time() + 600
  while not KILL_POINTS[when](workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  killed_at = checkpoint_steps(workdir)
  assert killed_at and killed_at[-1] < 3, killed_at
  err = finish(start(workdir, tiny_warmstart_dir))
  assert f"resumed from {workdir / 'checkpoints'} at step {killed_at[-1]}" in err
  assert not _saving(workdir)
  assert_same_run(uninterrupted, workdir)


def test_same_flags_and_seed_give_identical_metrics(tmp_path, tiny_warmstart_dir,
                                                     uninterrupted):
  workdir = tmp_path / "again"
  finish(start(workdir, tiny_warmstart_dir))
  assert_same_run(uninterrupted, workdir)


def test_leftovers_of_a_kill_are_cleaned_up(tmp_path, tiny_warmstart_dir, uninterrupted):
  """The state a kill during the third save leaves: checkpoint 3 unfinished (its temporary
  folder), metrics of steps 2 and 3 written after checkpoint 2... and a last line cut short."""
  workdir = tmp_path / "leftovers"
  shutil.copytree(uninterrupted, workdir)
  ckpts = workdir / "checkpoints"
  os.rename(ckpts / "3", ckpts / "3.orbax-checkpoint-tmp-1700000000000000")
  shutil.rmtree(ckpts / "2")
  os.remove(workdir / "eval.json")
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "loss": 0.1')  # the kill's half-written line
  err = finish(start(workdir, tiny_warmstart_dir))
  assert "at step 1" in err
  assert not glob.glob(str(ckpts / "*tmp*")), os.listdir(ckpts)
  assert checkpoint_steps(workdir) == [1, 2, 3]
  assert_same_run(uninterrupted, workdir)


def test_finished_run_restarted_changes_nothing(tmp_path, tiny_warmstart_dir, uninterrupted):
  """Restarting a finished run resumes at its last step: no step is redone, no line doubled."""
  workdir = tmp_path / "again"
  shutil.copytree(uninterrupted, workdir)
  finish(start(workdir, tiny_warmstart_dir))
  assert_same_run(uninterrupted, workdir)


def test_non_finite_updates_stop_the_run_without_a_checkpoint(tmp_path, tiny_warmstart_dir):
  """lr=1e39 overflows float32: every update is non-finite and skipped; after --max_bad_steps
  of them the run stops with one line, and no checkpoint of bad parameters exists."""
  workdir = tmp_path / "nan"
  err = finish(start(workdir, tiny_warmstart_dir, "--lr=1e39", "--max_bad_steps=2"),
               expect_rc=1)
  last = err.rstrip("\n").splitlines()[-1]
  assert "2 consecutive steps with non-finite loss or gradients (steps 1-2); stopping" in last
  assert "Traceback" not in err
  assert checkpoint_steps(workdir) == []
  records = rh.read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2]
  assert all(r["bad_updates"] == 2 for r in records), records


def test_killed_before_the_first_checkpoint_starts_over(tmp_path, tiny_warmstart_dir,
                                                        uninterrupted):
  """No complete checkpoint yet (killed during step 1's save): the restart begins at step 0 and
  the lines its first attempt wrote are dropped, not kept in front of the new ones."""
  workdir = tmp_path / "no_checkpoint"
  shutil.copytree(uninterrupted, workdir)
  ckpts = workdir / "checkpoints"
  os.rename(ckpts / "1", ckpts / "1.orbax-checkpoint-tmp-1700000000000000")
  shutil.rmtree(ckpts / "2")
  shutil.rmtree(ckpts / "3")
  os.remove(workdir / "eval.json")
  finish(start(workdir, tiny_warmstart_dir))
  assert [r["step"] for r in rh.read_metrics(workdir)] == [1, 2, 3]
  assert not _saving(workdir)
  assert_same_run(uninterrupted, workdir)
