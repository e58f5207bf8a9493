"""Tests for experiments/prepare_data.py and experiments/download_model.py, all offline.

The hub is faked: an injected loader (or a fake `datasets` / `huggingface_hub` module) serves the
hand-made source rows of tests/fixtures/hub/rows.json. The written files are read back with the
project's own loaders (brpo.tasks.data).
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import tomllib
import types

import pytest

from experiments import download_model
from experiments import data_sources
from experiments import prepare_data as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS_PATH = os.path.join(ROOT, "tests", "fixtures", "hub", "rows.json")

# (file, records written, records skipped) for the fixture rows.
EXPECTED = {
    "gsm8k/train.jsonl": (2, 2),
    "gsm8k/test.jsonl": (1, 1),
    "deepscaler/train.json": (2, 2),
    "math_train/math.json": (4, 1),
    "anytime_eval/aime.json": (2, 0),
    "anytime_eval/amc.json": (2, 1),
    "anytime_eval/math.json": (2, 0),
    "anytime_eval/minerva.json": (2, 1),
    "anytime_eval/olympiad_bench.json": (2, 1),
}


def _rows():
  with open(ROWS_PATH, encoding="utf-8") as f:
    return json.load(f)


class FakeHub:
  """A loader serving the fixture rows; counts calls."""

  def __init__(self):
    self.rows = _rows()
    self.calls = []

  def __call__(self, repo_id, config, split):
    self.calls.append((repo_id, config, split))
    key = f"{repo_id}:{config or ''}:{split}"
    if key not in self.rows:
      raise P.FetchError(f"{repo_id}: no such config/split {config}/{split} in the fake hub")
    return [dict(r) for r in self.rows[key]]


def _run(data_dir, names=None, **kw):
  out, err = io.StringIO(), io.StringIO()
  rc = P.prepare(str(data_dir), names or list(P.SOURCES), out=out, err=err, **kw)
  return rc, out.getvalue(), err.getvalue()


def _tree(data_dir):
  """{relative path: bytes} of every file under data_dir."""
  files = {}
  for base, _, names in os.walk(data_dir):
    for n in names:
      full = os.path.join(base, n)
      with open(full, "rb") as f:
        files[os.path.relpath(full, data_dir).replace(os.sep, "/")] = f.read()
  return files


@pytest.fixture
def prepared(tmp_path):
  hub = FakeHub()
  rc, out, err = _run(tmp_path, load=hub)
  assert rc == 0, err
  return tmp_path, hub, out


def test_every_file_loads_with_the_project_loaders(prepared):
  from brpo.tasks import data  # The project's loaders, unchanged.

  data_dir, _, _ = prepared
  for path, (records, _) in EXPECTED.items():
    examples = data.load_dataset(os.path.join(data_dir, path))
    assert len(examples) == records, path

  gsm = data.load_dataset(os.path.join(data_dir, "gsm8k", "train.jsonl"))
  assert gsm[0].answer == "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"
  assert gsm[1].question.startswith("A caf\u00e9")  # Non-ASCII survives the ASCII escapes.

  math_train = data.load_dataset(os.path.join(data_dir, "math_train", "math.json"))
  # Answers from the last \boxed{} (escaped braces inside), \boxed 1 and \fbox{0}.
  assert [e.answer for e in math_train] == ["2", "\\left( 2, \\{1\\} \\right)", "1", "0"]

  aime = data.load_dataset(os.path.join(data_dir, "anytime_eval", "aime.json"))
  assert [e.answer for e in aime] == ["204", "025"]  # No answer field: the solution's box.
  assert aime[0].id == "60"

  amc = data.load_dataset(os.path.join(data_dir, "anytime_eval", "amc.json"))
  assert [e.answer for e in amc] == ["142", "2.5"]

  math500 = data.load_dataset(os.path.join(data_dir, "anytime_eval", "math.json"))
  assert math500[0].id == "test/precalculus/807.json"
  assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"

  minerva = data.load_dataset(os.path.join(data_dir, "anytime_eval", "minerva.json"))
  assert minerva[0].question.startswith("Estimate the wavelength")
  assert [e.answer for e in minerva] == ["9.6", "1.07e16"]

  olympiad = data.load_dataset(os.path.join(data_dir, "anytime_eval", "olympiad_bench.json"))
  assert olympiad[0].answers == ("2",)
  # Several final answers are all required: one reference, not alternatives.
  assert olympiad[1].answers == ("$(1,8,19)$, $(2,7,13)$",)
  assert olympiad[1].id == "1610"


def test_paper_records_keep_the_paper_fields(prepared):
  data_dir, _, _ = prepared
  with open(os.path.join(data_dir, "anytime_eval", "olympiad_bench.json")) as f:
    records = json.load(f)
  assert list(records[0]) == ["problem", "answer", "id", "subfield", "context", "solution",
                              "is_multiple_answer", "unit", "answer_type", "error"]
  with open(os.path.join(data_dir, "anytime_eval", "amc.json")) as f:
    assert json.load(f)[0] == {
        "problem": "$\\frac{m}{n}$ is the fraction; what is $m+n$?", "answer": 142.0,
        "url": "https://artofproblemsolving.com/wiki/index.php/2022_AMC_12A_Problems/Problem_1",
        "id": 0}


def test_manifest_checksums_counts_and_sources(prepared):
  data_dir, _, out = prepared
  with open(os.path.join(data_dir, "MANIFEST.json")) as f:
    manifest = json.load(f)
  assert set(manifest["files"]) == set(EXPECTED)
  for path, (records, skipped) in EXPECTED.items():
    entry = manifest["files"][path]
    with open(os.path.join(data_dir, path), "rb") as f:
      content = f.read()
    assert entry["sha256"] == hashlib.sha256(content).hexdigest(), path
    assert entry["bytes"] == len(content)
    assert (entry["records"], entry["skipped"]) == (records, skipped), path
    source = P.SOURCES[entry["dataset"]]
    assert entry["source"] == source.repo_id
    # The skip count is reported per file on stdout too.
    assert f"wrote {path}: {records} records, {skipped} skipped" in out
  assert manifest["files"]["anytime_eval/math.json"]["source"] == "HuggingFaceH4/MATH-500"
  assert manifest["files"]["gsm8k/test.jsonl"]["parts"] == [{"config": "main", "split": "test"}]


def test_idempotent_and_deterministic(prepared, tmp_path_factory):
  data_dir, hub, _ = prepared
  first = _tree(data_dir)
  assert all(content.isascii() for content in first.values())

  # Again without --overwrite: nothing fetched, nothing changed.
  hub2 = FakeHub()
  rc, out, _ = _run(data_dir, load=hub2)
  assert rc == 0 and hub2.calls == []
  assert out.count("up to date") == len(P.SOURCES)
  assert _tree(data_dir) == first

  # --overwrite fetches again and writes the same bytes; so does a fresh folder.
  hub3 = FakeHub()
  assert _run(data_dir, load=hub3, overwrite=True)[0] == 0
  assert len(hub3.calls) == len(hub.calls)
  assert _tree(data_dir) == first
  fresh = tmp_path_factory.mktemp("fresh")
  assert _run(fresh, load=FakeHub())[0] == 0
  assert _tree(fresh) == first


def test_subset_keeps_other_manifest_entries(tmp_path):
  assert _run(tmp_path, ["gsm8k"], load=FakeHub())[0] == 0
  assert _run(tmp_path, ["amc"], load=FakeHub())[0] == 0
  with open(os.path.join(tmp_path, "MANIFEST.json")) as f:
    files = json.load(f)["files"]
  assert sorted(files) == ["anytime_eval/amc.json", "gsm8k/test.jsonl", "gsm8k/train.jsonl"]
  assert not os.path.exists(os.path.join(tmp_path, "deepscaler"))


def test_changed_file_is_refused_then_overwritten(prepared):
  data_dir, _, _ = prepared
  path = os.path.join(data_dir, "anytime_eval", "amc.json")
  with open(path, "w") as f:
    f.write("[]\n")
  rc, _, err = _run(data_dir, ["amc"], load=FakeHub())
  assert rc == 1
  assert err.strip().splitlines()[-1].startswith("error: files of 1 set(s) differ")
  with open(path) as f:
    assert f.read() == "[]\n"  # Not silently replaced.
  assert _run(data_dir, ["amc"], load=FakeHub(), overwrite=True)[0] == 0
  with open(os.path.join(data_dir, "MANIFEST.json")) as f:
    entry = json.load(f)["files"]["anytime_eval/amc.json"]
  with open(path, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]


def _fake_datasets(load_dataset):
  module = types.ModuleType("datasets")
  module.load_dataset = load_dataset
  return module


def test_no_network_prints_what_to_fetch_and_one_error_line(tmp_path, monkeypatch):
  calls = []

  def offline(path, name=None, split=None):
    calls.append(path)
    raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

  monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(offline))
  data_dir = os.path.join(tmp_path, "data")
  rc, out, err = _run(data_dir)
  assert rc == 1
  assert len(calls) == 1  # After one connection failure the hub is not tried again.
  lines = err.strip().splitlines()
  assert lines[-1].startswith("error: could not fetch gsm8k, deepscaler, math_train, aime, amc, "
                              "math500, minerva, olympiad_bench (no network")
  for source in P.SOURCES.values():
    assert f"{source.name}: " in err
    assert source.url in err
    assert f"--local-dir {os.path.join(data_dir, 'hub', *source.repo_id.split('/'))}" in err
    assert os.path.join(data_dir, "hub", *source.repo_id.split("/")) in err
    for f in source.files:
      assert os.path.join(data_dir, *f.path.split("/")) in err
  assert "config main; split test, train" in err
  assert "config OE_TO_maths_en_COMP" in err
  assert not os.path.exists(data_dir)  # Nothing written.


def test_without_datasets_package(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError.
  rc, _, err = _run(tmp_path, ["aime"])
  assert rc == 1
  assert "aime: the `datasets` package is not installed (pip install -e '.[data]')" in err
  assert err.strip().splitlines()[-1].startswith("error: could not fetch aime")


def test_default_loader_goes_through_datasets_load_dataset(tmp_path, monkeypatch):
  hub = FakeHub()
  seen = []

  def load_dataset(path, name=None, split=None):
    seen.append((path, name, split))
    return hub(path.replace(os.sep, "/").split("hub/")[-1], name, split)

  monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
  # A snapshot folder under <data_dir>/hub is read instead of the network.
  os.makedirs(os.path.join(tmp_path, "hub", "HuggingFaceH4", "aime_2024"))
  assert _run(tmp_path, ["gsm8k", "aime"])[0] == 0
  assert seen == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test"),
                  (os.path.join(str(tmp_path), "hub", "HuggingFaceH4", "aime_2024"), None,
                   "train")]


def _fake_package_dir(tmp_path, name, body):
  pkg = os.path.join(tmp_path, "fakepkgs", name)
  os.makedirs(pkg)
  with open(os.path.join(pkg, "__init__.py"), "w") as f:
    f.write(body)
  return os.path.dirname(pkg)


def _cli(script, args, pythonpath_first):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([pythonpath_first, ROOT])
  env["HF_HUB_OFFLINE"] = "1"
  env["HF_DATASETS_OFFLINE"] = "1"
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_prepare_cli_offline(tmp_path):
  fake = _fake_package_dir(tmp_path, "datasets", (
      "def load_dataset(path, name=None, split=None):\n"
      "  raise ConnectionError(\"Couldn't reach %r on the Hub\" % path)\n"))
  data_dir = os.path.join(tmp_path, "data")
  proc = _cli("prepare_data.py", [f"--data_dir={data_dir}", "--datasets=minerva,amc"], fake)
  assert proc.returncode == 1, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: could not fetch amc, minerva (no network")
  assert "https://huggingface.co/datasets/math-ai/minervamath" in proc.stderr
  assert not os.path.exists(data_dir)

  proc = _cli("prepare_data.py", [f"--data_dir={data_dir}", "--datasets=gsm9k"], fake)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown data set(s) gsm9k")


def test_parse_names():
  assert P.parse_names(["all"]) == list(P.SOURCES)
  assert P.parse_names([]) == list(P.SOURCES)
  assert P.parse_names(["minerva", "gsm8k"]) == ["gsm8k", "minerva"]  # Canonical order.
  with pytest.raises(ValueError, match="unknown data set"):
    P.parse_names(["aime24"])


@pytest.mark.parametrize("solution,answer", [
    ("so $x=\\boxed{5}$.", "5"),
    ("$\\boxed{1}$ then $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
    ("$\\boxed {x^{2}}$", "x^{2}"),
    ("$\\fbox{7}$", "7"),
    ("the answer is $\\boxed 3$.", "3"),
    ("$\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),
    ("no box", None),
    ("$\\boxed{}$", None),
    ("$\\boxed{unbalanced", None),
    (None, None),
])
def test_last_boxed(solution, answer):
  assert data_sources.last_boxed(solution) == answer


def test_render_rejects_nan():
  with pytest.raises(ValueError):
    P.render([{"problem": "p", "answer": float("nan")}], "json")
  # The converters never let one through.
  assert P.SOURCES["amc"].convert({"problem": "p", "answer": float("nan")}) is None


# ---------------------------------------------------------------------------------------------
# download_model.py


def test_download_model_keeps_only_weights_config_tokenizer(tmp_path):
  calls = []

  def snapshot_download(repo_id, revision, local_dir, allow_patterns):
    calls.append((repo_id, revision, allow_patterns))
    os.makedirs(local_dir, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
      with open(os.path.join(local_dir, name), "w") as f:
        f.write("{}")
    return local_dir

  out_dir = os.path.join(tmp_path, "r1")
  path = download_model.download(download_model.DEFAULT_REPO, out_dir,
                                 snapshot_download=snapshot_download)
  assert path == out_dir
  (repo_id, revision, patterns), = calls
  assert repo_id == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" and revision is None
  assert "*.safetensors" in patterns and "config.json" in patterns
  assert "tokenizer.json" in patterns
  assert not any(p.endswith(".bin") or p in ("*", "*.md") for p in patterns)


def test_download_model_errors_are_one_line(tmp_path, monkeypatch):
  def offline(**kw):
    raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore")

  with pytest.raises(RuntimeError) as e:
    download_model.download("org/model", str(tmp_path), snapshot_download=offline)
  assert "\n" not in str(e.value)
  assert str(e.value).startswith("could not download org/model from the Hugging Face hub "
                                 "(OSError: We couldn't connect")

  def no_weights(local_dir, **kw):
    return local_dir

  with pytest.raises(RuntimeError, match="no config.json"):
    download_model.download("org/model", str(tmp_path), snapshot_download=no_weights)

  monkeypatch.setitem(sys.modules, "huggingface_hub", None)
  with pytest.raises(RuntimeError, match=r"huggingface_hub. package is not installed"):
    download_model.download("org/model", str(tmp_path))


def test_download_model_cli_offline(tmp_path):
  fake = _fake_package_dir(tmp_path, "huggingface_hub", (
      "def snapshot_download(**kw):\n"
      "  raise OSError(\"We couldn't connect to 'https://huggingface.co'\")\n"))
  proc = _cli("download_model.py", [f"--out_dir={tmp_path}/m"], fake)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "error: could not download deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")


# ---------------------------------------------------------------------------------------------
# Packaging.


def test_optional_extras_and_default_requirements():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  assert any(r.startswith("datasets") for r in extras["data"])
  assert any(r.startswith("huggingface_hub") for r in extras["hub"])
  assert any(r.startswith("jax[cuda12]==") for r in extras["gpu"])
  assert any(r.startswith("jax[tpu]==") for r in extras["tpu"])
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    text = f.read()
  assert "datasets" not in text and "huggingface_hub" not in text
  # The accelerator extras pin the jax of the default run.
  pinned = [l.split("==")[1].strip() for l in text.splitlines() if l.startswith("jax[cpu]==")]
  assert pinned and all(r.endswith("==" + pinned[0]) for r in extras["gpu"] + extras["tpu"])
