"""A gs:// workdir: metrics, evaluation files, plots, TensorBoard and checkpoints go through
etils.epath onto the object store, and no local folder named "gs:" appears.

The object store is faked: `etils.epath.testing.mock_epath` routes every epath call on a
gs://<bucket>/<path> to <tmp>/gcs/<bucket>/<path>, and orbax's TensorStore spec for a gs:// path
(its "gcs" driver) is replaced by a "file" spec on the same local folder. Orbax's own GCS code
paths (commit-file atomicity instead of renames, gs:// string handling) run as on GCS; the
bucket API calls (hierarchical namespace) are stubbed out.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from brpo.run import evaluation
from brpo import paths
from brpo.run.checkpointing import Checkpointer
from brpo.run.metrics import MetricsWriter

RESULT = {"budgets": [2, 4], "accuracy": [0.25, 0.5], "anytime_score": 0.375,
          "final_accuracy": 0.5, "mean_thinking_tokens": 3.0, "n_questions": 2, "samples": 1}


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """The local folder standing for gs://; the test runs in an empty current directory."""
  root = tmp_path / "gcs"
  root.mkdir()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)

  def local(p):
    p = os.fspath(p)
    return str(root / p[len("gs://"):]) if p.startswith("gs://") else p

  def remote(p):
    p = os.fspath(p)
    return "gs://" + p[len(str(root)) + 1:] if p.startswith(str(root) + os.sep) else p

  def one(fn, p, *a, **k):
    return fn(local(p), *a, **k)

  def two(fn, p, dst, *a, **k):
    return fn(local(p), local(dst), *a, **k)

  def glob(fn, p):
    return [remote(x) for x in fn(local(p))]

  def walk(fn, top, **k):
    for d, dirs, files in fn(local(top), **k):
      yield remote(d), dirs, files

  from orbax.checkpoint._src.path import gcs_utils

  def kvstore(path):
    return {"driver": "file", "path": local(path)}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  with epath_testing.mock_epath(
      open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
      rmtree=one, stat=one, rename=two, replace=two, copy=two, glob=glob, walk=walk):
    yield root
  assert not os.path.exists(cwd / "gs:"), os.listdir(cwd)
  assert os.listdir(cwd) == [], os.listdir(cwd)


def test_fake_store_maps_gs_paths(gcs):
  epath.Path("gs://b/x").mkdir(parents=True, exist_ok=True)
  epath.Path("gs://b/x/f.txt").write_text("hi")
  assert (gcs / "b" / "x" / "f.txt").read_text() == "hi"
  assert paths.is_remote("gs://b/x") and not paths.is_remote("workdir/x")
  assert paths.resolve("gs://b/x") == "gs://b/x"
  assert paths.resolve("w") == os.path.abspath("w")


def test_metrics_writer_appends_and_truncates_on_gs(gcs):
  workdir = "gs://bucket/run"
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # as Run does
  w = MetricsWriter(workdir)
  for step in range(1, 5):
    w.write(step, {"loss": 1.0 / step, "reward": float(step)})
  w.close()
  local = gcs / "bucket" / "run"
  lines = (local / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
  # TensorBoard events were written locally and copied under <workdir>/tb.
  events = os.listdir(local / "tb")
  assert events and all(n.startswith("events.out.tfevents") for n in events)
  assert all((local / "tb" / n).stat().st_size > 0 for n in events)
  assert w._tb_local is None  # the local copy is gone

  # A resumed run at step 2 (and a last line cut short by a kill).
  with open(local / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')
  w = MetricsWriter(workdir, resume_step=2)
  kept = w.truncate_after(2)
  assert [r["step"] for r in kept] == [1, 2]
  assert [json.loads(x)["step"] for x in (local / "metrics.jsonl").read_text().splitlines()] \
      == [1, 2]
  w.write(3, {"loss": 0.5})
  w.close()
  assert [json.loads(x)["step"] for x in (local / "metrics.jsonl").read_text().splitlines()] \
      == [1, 2, 3]
  assert not (local / "metrics.jsonl.tmp").exists()
  # One events file per writer (named by the second it opened: the same name within a second,
  # as in a local workdir).
  assert 1 <= len(os.listdir(local / "tb")) <= 2


def test_write_eval_and_plot_on_gs(gcs):
  workdir = "gs://bucket/run"
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  path = evaluation.write_eval(RESULT, workdir)
  assert path == "gs://bucket/run/eval.json"
  local = gcs / "bucket" / "run"
  assert json.loads((local / "eval.json").read_text()) == RESULT
  assert not (local / "eval.json.tmp").exists()
  evaluation.plot_accuracy({"run": RESULT}, os.path.join(workdir, "accuracy.png"))
  assert (local / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpointer_saves_and_restores_on_gs(gcs):
  directory = "gs://bucket/run/checkpoints"
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
  ck = Checkpointer(directory, keep=2, cleanup_tmp=True)
  assert ck.directory == directory  # not turned into a local absolute path
  for step in (1, 2, 3):
    state = jax.tree.map(lambda x: x + 1, state)
    assert ck.save(step, state, {"step": step, "data": [step]})
  assert ck.all_steps() == [2, 3]
  ck.close()
  local = gcs / "bucket" / "run" / "checkpoints"
  assert sorted(os.listdir(local)) == ["2", "3"]
  # Orbax took its GCS path: completion marked by a commit file, not by a rename.
  assert (local / "3" / "commit_success.txt").exists()

  ck = Checkpointer(directory)
  assert ck.latest_step() == 3
  assert ck.restore_meta() == {"step": 3, "data": [3]}
  restored, meta = ck.restore(jax.eval_shape(lambda: state))
  ck.close()
  assert meta["step"] == 3
  np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3) + 3)
  assert int(restored["step"]) == 3


def test_local_workdir_unchanged(tmp_path):
  """A local workdir: the same files, written as before (atomic renames, appends)."""
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  w = MetricsWriter(workdir)
  w.write(1, {"loss": 1.0})
  w.write(2, {"loss": 0.5})
  assert [r["step"] for r in w.truncate_after(1)] == [1]
  w.close()
  assert w._tb_local is None and os.listdir(os.path.join(workdir, "tb"))
  evaluation.write_eval(RESULT, workdir)
  evaluation.plot_accuracy({"run": RESULT}, os.path.join(workdir, "accuracy.png"))
  assert sorted(os.listdir(workdir)) == ["accuracy.png", "eval.json", "metrics.jsonl", "tb"]
  ck = Checkpointer(os.path.relpath(os.path.join(workdir, "checkpoints")))
  assert ck.directory == os.path.join(workdir, "checkpoints")
  ck.close()


def test_warm_start_on_gs(gcs):
  """A warm start trained into a gs:// directory (tokenizer, params, settings) and reused."""
  from brpo.tasks.arith import warmstart

  ws = warmstart.WarmStartConfig(steps=2, batch_size=2, n_train=8, stop_accuracy=0.0)
  directory = "gs://bucket/warmstart"
  cfg, params, tok = warmstart.warm_start(directory, ws, progress=False)
  local = gcs / "bucket" / "warmstart"
  assert {warmstart.SETTINGS_FILE, warmstart.TOKENIZER_FILE, warmstart.PARAMS_DIR} <= set(
      os.listdir(local))
  assert not (local / (warmstart.SETTINGS_FILE + ".tmp")).exists()
  cfg2, params2, tok2 = warmstart.warm_start(directory, ws, progress=False)  # reused
  assert cfg2 == cfg and tok2.vocab_size == tok.vocab_size
  jax.tree.map(np.testing.assert_array_equal, params2, params)
