"""Tests for brpo.data: file loaders and their one-line errors, dedup, and the resumable iterator.

Reads only the small files under tests/fixtures/data and files written to tmp_path.
"""

import json
import os

import pytest

from brpo.tasks import data
from brpo.tasks.data import DataIterator, Example

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
GSM8K = os.path.join(FIXTURES, "gsm8k_small.jsonl")
PAPER = os.path.join(FIXTURES, "paper_small.json")


def _write(tmp_path, name, text):
  path = os.path.join(tmp_path, name)
  with open(path, "w") as f:
    f.write(text)
  return path


def test_gsm8k_jsonl_keeps_full_answer():
  examples = data.load_dataset(GSM8K)
  assert len(examples) == 3  # The blank line between records is skipped.
  first = examples[0]
  assert first.question == "Tom has 3 apples and buys 4 more. How many apples does he have?"
  assert first.answer == "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"
  assert first.alternatives == ()
  assert first.id == "gsm8k_small.jsonl:1"
  assert examples[2].id == "gsm8k_small.jsonl:4"  # Ids name the file line.
  assert examples[2].answer.endswith("#### 4")


def test_paper_json_list_answers_numbers_and_null():
  examples = data.load_dataset(PAPER)
  assert [e.question for e in examples] == [
      "What is $1+1$?", "Find the speed of light in units of $10^8$ m/s.", "Compute $71 \\cdot 2$."]
  assert examples[0] == Example("What is $1+1$?", "2", "test/algebra/1.json")
  # A list answer: the first is the answer, the rest alternatives; trailing newlines stripped.
  assert examples[1].answer == "3.0"
  assert examples[1].alternatives == ("2.998",)
  assert examples[1].answers == ("3.0", "2.998")
  assert examples[1].id == "paper_small.json#1"
  assert examples[2].answer == "142"  # 142.0 as AMC stores it.
  # The record with a null answer (as in MATH train) is skipped, not an error.


def test_json_lines_with_paper_fields_and_json_extension(tmp_path):
  path = _write(tmp_path, "p.json", '{"problem": "2+2?", "answer": 4}\n'
                '{"problem": "3+3?", "answer": "6"}\n')
  examples = data.load_file(path)
  assert [(e.question, e.answer) for e in examples] == [("2+2?", "4"), ("3+3?", "6")]


@pytest.mark.parametrize("name, text, line, words", [
    ("bad.jsonl", '{"question": "q", "answer": "#### 1"}\n\n{"question": "q2", "answer": \n',
     3, "malformed JSON"),
    ("noans.jsonl", '{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n',
     2, "missing field 'answer'"),
    ("noq.jsonl", '{"answer": "#### 1"}\n', 1, "missing field 'question'"),
    ("nohash.jsonl", '{"question": "q", "answer": "the answer is 5"}\n', 1, "####"),
    ("notobj.jsonl", '[1, 2]\n{"question": "q", "answer": "#### 1"}\n', 1, "JSON object"),
    ("bad.json", '[\n  {"problem": "a", "answer": "1"},\n  {"problem": "b", "answer": }\n]\n',
     3, "malformed JSON"),
    ("comma.json", '[\n  {"problem": "a", "answer": "1"}\n  {"problem": "b", "answer": "2"}\n]',
     3, "malformed JSON"),
    ("noans.json", '[\n  {"problem": "a", "answer": "1"},\n  {\n    "problem": "b"\n  }\n]\n',
     3, "missing field 'answer'"),
    ("badtype.json", '[{"problem": "a", "answer": {"x": 1}}]', 1, "field 'answer'"),
    ("emptylist.json", '[{"problem": "a", "answer": []}]', 1, "empty list"),
    ("emptyq.json", '[{"problem": " ", "answer": "1"}]', 1, "non-empty string"),
    ("empty.jsonl", "\n\n", 1, "empty data set"),
    ("empty.json", "[]", 1, "empty data set"),
    ("allnull.json", '[{"problem": "a", "answer": null}]', 1, "empty data set"),
    ("tail.json", '[{"problem": "a", "answer": "1"}]\n\nxyz', 3, "malformed JSON"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, name, text, line, words):
  path = _write(tmp_path, name, text)
  with pytest.raises(ValueError) as err:
    data.load_dataset(path, on_bad_record="error")
  message = str(err.value)
  assert message.startswith(f"{path}:{line}: "), message
  assert words in message
  assert "\n" not in message


def test_bad_records_are_skipped_with_one_warning_naming_file_and_lines(tmp_path, caplog):
  text = ('[\n  {"problem": "a", "answer": "1"},\n  {"problem": "b", "answer": ""},\n'
          '  {"problem": "c", "answer": null},\n  {"problem": "d", "answer": "4"},\n'
          '  {"problem": "e", "answer": []}\n]\n')
  path = _write(tmp_path, "math.json", text)
  with caplog.at_level("WARNING", logger="brpo"):
    examples = data.load_dataset(path)  # on_bad_record="skip", the default
  assert [e.question for e in examples] == ["a", "d"]
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert warnings == [f"{path}: skipped 3 record(s) that cannot be graded or read: line "
                      "3 (field 'answer' is empty), 4 (field 'answer' is null), "
                      "6 (field 'answer' is an empty list)"]
  lines = _write(tmp_path, "g.jsonl", '{"question": "q", "answer": "#### 1"}\n{"question": \n'
                 '{"question": "q3"}\n')
  assert len(data.load_dataset(lines)) == 1
  with pytest.raises(ValueError, match=r"g.jsonl:2: malformed JSON"):
    data.load_dataset(lines, on_bad_record="error")
  allbad = _write(tmp_path, "allbad.json", '[{"problem": "a", "answer": ""}]')
  with pytest.raises(ValueError, match=r"allbad.json:1: empty data set \(all 1 records skipped; "
                     r"the first: field 'answer' is empty\)$"):
    data.load_dataset(allbad)
  with pytest.raises(ValueError, match="on_bad_record='drop'"):
    data.load_dataset(allbad, on_bad_record="drop")


def test_missing_file_and_unknown_spec():
  with pytest.raises(ValueError, match="^/no/such/file.jsonl: data file does not exist$"):
    data.load_dataset("/no/such/file.jsonl")
  with pytest.raises(ValueError, match="unknown data set 'gsm9k'"):
    data.load_dataset("gsm9k:train")


def test_arith_spec_goes_to_the_task():
  examples = data.load_dataset("arith:test:n=5,terms=3")
  assert len(examples) == 5
  assert all(e.question.endswith("=?") and e.id.startswith("arith-test-") for e in examples)
  assert examples == data.load_dataset("arith:test:n=5,terms=3")


def test_dedup_drops_normalised_duplicates_from_train_only():
  train = [Example("What is 1+1?", "2", "t0"), Example("what  is\n1+1? ", "2", "t1"),
           Example("What is 2+2?", "4", "t2"), Example("What is 1+1", "2", "t3")]
  evals = [Example("WHAT IS 1+1?", "2", "e0"), Example("What is 3+3?", "6", "e1")]
  kept, dropped = data.dedup_train_eval(train, evals)
  assert dropped == 2
  assert [e.id for e in kept] == ["t2", "t3"]  # Order kept; punctuation still matters.
  assert data.normalize_question("  A\tb\n C ") == "a b c"


def _examples(n):
  return [Example(f"q{i}", str(i), f"id{i}") for i in range(n)]


def test_iterator_covers_each_epoch_once_and_is_seeded():
  examples = _examples(12)
  it = DataIterator(examples, batch_size=4, seed=3)
  epoch0 = [e.id for _ in range(3) for e in next(it)]
  assert sorted(epoch0) == sorted(e.id for e in examples)
  assert it.state() == {"epoch": 1, "index": 0, "seed": 3, "size": 12}
  epoch1 = [e.id for _ in range(3) for e in next(it)]
  assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0  # A fresh permutation per epoch.
  again = DataIterator(examples, batch_size=4, seed=3)
  assert [e.id for _ in range(3) for e in next(again)] == epoch0
  other = DataIterator(examples, batch_size=4, seed=4)
  assert [e.id for _ in range(3) for e in next(other)] != epoch0


def test_iterator_batches_cross_epochs_full():
  it = DataIterator(_examples(5), batch_size=3, seed=0)
  batches = [next(it) for _ in range(5)]
  assert all(len(b) == 3 for b in batches)
  flat = [e.id for b in batches for e in b]
  assert sorted(flat[:5]) == sorted(flat[5:10]) == [f"id{i}" for i in range(5)]
  assert it.state()["epoch"] == 3 and it.state()["index"] == 0


def test_iterator_restore_equals_uninterrupted():
  examples = _examples(7)
  straight = DataIterator(examples, batch_size=3, seed=11)
  expected = [[e.id for e in next(straight)] for _ in range(9)]
  first = DataIterator(examples, batch_size=3, seed=11)
  got = [[e.id for e in next(first)] for _ in range(4)]
  saved = json.loads(json.dumps(first.state()))  # The state survives a JSON round trip.
  resumed = DataIterator(examples, batch_size=3, seed=11)
  resumed.restore(saved)
  got += [[e.id for e in next(resumed)] for _ in range(5)]
  assert got == expected


def test_iterator_errors():
  with pytest.raises(ValueError, match="empty data set"):
    DataIterator([], batch_size=2, seed=0)
  with pytest.raises(ValueError, match="batch_size=0"):
    DataIterator(_examples(3), batch_size=0, seed=0)
  saved = DataIterator(_examples(3), batch_size=2, seed=0).state()
  with pytest.raises(ValueError, match="seed=0, 3 examples; this iterator has seed=1"):
    DataIterator(_examples(3), batch_size=2, seed=1).restore(saved)
