"""Tests for brpo.arith: deterministic questions, exact gold traces that grade correct, and a
tokenizer that round-trips every trace without unknown pieces."""

import dataclasses
import string

import numpy as np
import pytest

from brpo.tasks.arith import task as arith
from brpo import grading as rewards
from brpo.tasks.data import Example
from models import tokenizer as tok_lib

TASK = arith.ArithTask(min_terms=2, max_terms=7, digits=2)


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("arith_tok") / "arith.model")
  return arith.train_tokenizer(path, TASK, seed=0)


def test_hand_worked_trace():
  ex = Example("37+18-5+22=?", "72", "x")
  assert arith.parse_question(ex.question) == [37, 18, -5, 22]
  trace = arith.gold_trace(ex, restate=True, check=True)
  assert trace.prompt == "37+18-5+22=?\n<think>\n"
  assert trace.thinking == "sum 37+18-5+22\n37+18=55\n55-5=50\n50+22=72\ncheck 37+18-5+22=72\n"
  assert trace.summary == "</think>\n\n**Final Answer**\n\\boxed{72}"
  bare = arith.gold_trace(ex, restate=False, check=False)
  assert bare.thinking == "37+18=55\n55-5=50\n50+22=72\n"
  assert trace.text == trace.prompt + trace.thinking + trace.summary


def test_generation_is_deterministic_and_valid():
  a = arith.generate(300, seed=5, task=TASK)
  assert a == arith.generate(300, seed=5, task=TASK)
  assert a != arith.generate(300, seed=6, task=TASK)
  counts = set()
  for ex in a:
    terms = arith.parse_question(ex.question)
    counts.add(len(terms))
    assert int(ex.answer) == sum(terms)
    assert all(1 <= abs(t) <= 99 for t in terms)
    assert all(s >= 0 for s in np.cumsum(terms))  # The running sum never goes negative.
    assert arith.question_text(terms) == ex.question
  assert counts == set(range(2, 8))
  assert any("-" in ex.question for ex in a) and any("+" in ex.question for ex in a)


def test_spec_parsing_and_splits():
  split, n, seed, task = arith.parse_spec("arith:test:n=7,terms=4-9,digits=3,seed=2,p_check=0")
  assert (split, n, seed) == ("test", 7, 2)
  assert task == arith.ArithTask(min_terms=4, max_terms=9, digits=3, p_check=0.0)
  assert arith.parse_spec("arith:train")[1:3] == (20_000, 0)
  assert arith.parse_spec("arith:test:terms=5")[3].max_terms == 5
  train = arith.load("arith:train:n=50")
  test = arith.load("arith:test:n=50")
  assert [e.question for e in train] != [e.question for e in test]
  assert arith.load("arith:test:n=50") == test
  for bad, words in [("arith:", "expected arith:<split>"), ("arith:test:n", "key=value"),
                     ("arith:test:colour=red", "unknown key"), ("arith:test:n=0", "n=0"),
                     ("arith:test:terms=1", "min_terms"), ("arith:test:digits=x", "'digits=x'")]:
    with pytest.raises(ValueError, match=words):
      arith.parse_spec(bad)
  with pytest.raises(ValueError, match="not an arith question"):
    arith.parse_question("what is 2+2?")


def test_gold_traces_grade_correct_and_cuts_do_not():
  rng = np.random.default_rng(0)
  for ex in arith.generate(40, seed=1, task=TASK):
    trace = arith.sample_trace(ex, TASK, rng)
    response = trace.summary[len(tok_lib.THINK_END):]
    assert response.startswith(arith.ANSWER_PREFIX)
    assert rewards.score(trace.thinking + tok_lib.THINK_END, response, ex.answer) == 1.0
    wrong = arith.ANSWER_PREFIX + arith.answer_text(int(ex.answer) + 1)
    assert rewards.score(trace.thinking + tok_lib.THINK_END, wrong, ex.answer) == 0.0
    # A cut thinking with the inserted text also passes the one-`</think>` gate.
    cut = trace.thinking[:10] + arith.CUT_TEXT
    assert rewards.score(cut, response, ex.answer) == 1.0


def test_tokenizer_round_trips_every_trace_without_unk(sp_tokenizer):
  tok = sp_tokenizer
  assert tok.eos_id == arith.EOS_ID and tok.pad_id == arith.PAD_ID
  assert tok.think_end_ids == (tok.token_to_id("</think>"),)
  for piece in ("<think>", "</think>", "\\boxed{"):
    assert len(tok.encode(piece)) == 1, piece
  assert len(tok.encode("**Final Answer**")) == 1
  rng = np.random.default_rng(0)
  for ex in arith.generate(200, seed=2, task=TASK):
    trace = arith.sample_trace(ex, TASK, rng)
    ids, prompt_len = arith.encode_trace(tok, trace)
    assert arith.UNK_ID not in ids
    assert ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1
    assert tok.decode(ids[:-1]) == trace.text
    assert ids[:-1] == tok.encode(trace.text)  # Parts encode as the whole does.
    assert tok.decode(ids[:prompt_len]) == trace.prompt
  for text in (arith.CUT_TEXT, arith.ANSWER_PREFIX, arith.CUT_TEXT + arith.ANSWER_PREFIX,
               string.printable, "Größe 3€"):
    ids = tok.encode(text)
    assert arith.UNK_ID not in ids and tok.decode(ids) == text, repr(text)


def test_tokenizer_is_deterministic(tmp_path, sp_tokenizer):
  again = arith.train_tokenizer(str(tmp_path / "again.model"), TASK, seed=0)
  with open(sp_tokenizer.path, "rb") as f1, open(again.path, "rb") as f2:
    assert f1.read() == f2.read()


def test_length_table_grows_with_terms(sp_tokenizer):
  table = arith.length_table(sp_tokenizer, TASK, n=600, seed=0)
  assert sorted(table) == list(range(2, 8))
  means = [table[k]["mean"] for k in sorted(table)]
  assert all(b > a for a, b in zip(means, means[1:]))
  # Without the redundant lines the thinking is exactly the step lines.
  bare = dataclasses.replace(TASK, p_restate=0.0, p_check=0.0)
  for ex in arith.generate(50, seed=3, task=bare):
    terms = arith.parse_question(ex.question)
    think = arith.thinking_text(terms, restate=False, check=False)
    assert think.count("\n") == len(terms) - 1
    assert think.endswith(f"={ex.answer}\n")
