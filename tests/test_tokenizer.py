"""Tokenizer tests: a SentencePiece model trained here, the SmolLM2 tokenizer exported from GGUF.

Round trips, special tokens found by name, `</think>` as one id or a sequence, and the prompt
templates of SPEC §4.
"""

from __future__ import annotations

import json
import os
import unicodedata

import pytest

from models import checkpoint, tokenizer
from models.checkpoint import CheckpointError
from models.tokenizer import HFTokenizer, SentencePieceTokenizer

ROUND_TRIP_TEXTS = (
    "Hello, world!",
    "12 + 34 = 46, so 3.14159 * 1,000,000 is about 3141590.",
    "Step 1: add.\n\nStep 2: carry the 1.\n\n\n",
    "tabs\t\tand   runs   of spaces   ",
    "   leading spaces",
    "café naïve résumé 你好 世界 🙂 Ω≈ç√ ½",
    "<think>\nLet me think.\n</think>\n\n**Final Answer**\n\\boxed{42}",
    "x</think>y and </think> alone",
    "",
)

# ---------------------------------------------------------------------------------------------
# SentencePiece, trained at test time.

SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "12 + 34 = 46, so the answer is 46.",
    "<think> Let me think step by step. </think> The answer is 7.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "What is the sum of the first ten positive integers? Let's add them up.",
] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
  import sentencepiece as spm

  prefix = str(tmp_path_factory.mktemp("sp") / "tiny")
  # identity normalization + byte fallback: every string round-trips exactly (whitespace runs
  # and characters unseen in the corpus included).
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(SP_CORPUS), model_prefix=prefix, vocab_size=400,
      model_type="bpe", user_defined_symbols=["<think>", "</think>"], byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0, bos_id=1,
      eos_id=2, pad_id=3, hard_vocab_limit=False, minloglevel=2)
  return prefix + ".model"


def test_sentencepiece_round_trip(sp_model):
  tok = tokenizer.load_tokenizer(sp_model)
  assert isinstance(tok, SentencePieceTokenizer)
  for text in ROUND_TRIP_TEXTS:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text, text


def test_sentencepiece_special_tokens(sp_model):
  tok = SentencePieceTokenizer(sp_model)
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 3)
  assert tok.token_to_id("</s>") == tok.eos_id and tok.token_to_id("<pad>") == tok.pad_id
  assert tok.token_to_id("no-such-piece") is None
  assert tok.token_to_id("<unk>") == 0
  end = tok.token_to_id("</think>")
  assert end is not None and tok.think_end_ids == (end,)
  # The user-defined symbol stays whole inside text.
  ids = tok.encode("so x</think>y")
  assert ids.count(end) == 1 and tok.token_to_id("<think>") in tok.encode("<think> hm")
  # Special tokens can be named explicitly, and a wrong name is an error naming the file.
  assert SentencePieceTokenizer(sp_model, eos="</think>").eos_id == end
  with pytest.raises(ValueError, match="not in the vocabulary") as e:
    SentencePieceTokenizer(sp_model, pad="<nope>")
  assert sp_model in str(e.value)


def test_sentencepiece_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError):
    SentencePieceTokenizer(str(tmp_path / "absent.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a readable SentencePiece model") as e:
    SentencePieceTokenizer(str(bad))
  assert str(bad) in str(e.value)


# ---------------------------------------------------------------------------------------------
# SmolLM2's byte-level BPE, exported from the GGUF.


@pytest.fixture(scope="module")
def smollm2_tokenizers(tmp_path_factory):
  """(our exported tokenizer folder, transformers' tokenizer built from the same GGUF)."""
  try:
    path = checkpoint.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  import transformers

  out = str(tmp_path_factory.mktemp("smollm2_tok"))
  assert checkpoint.tokenizer_from_gguf(path, out) == os.path.join(out, "tokenizer.json")
  theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))
  return out, theirs


def _digit_isolated_reference(theirs, text: str) -> list[int]:
  """SmolLM2's real pre-tokenizer (Digits(individual) then GPT-2 ByteLevel), built from pieces.

  Every numeric character (Unicode N*, as the Rust `char::is_numeric` of tokenizers' Digits) is
  its own piece; the stretches between them go through transformers' GGUF tokenizer, which is
  correct on text without numerals.
  """
  ids, stretch = [], ""
  for ch in text:
    if unicodedata.category(ch).startswith("N"):
      if stretch:
        ids += theirs.encode(stretch, add_special_tokens=False)
      ids += theirs.encode(ch, add_special_tokens=False)
      stretch = ""
    else:
      stretch += ch
  if stretch:
    ids += theirs.encode(stretch, add_special_tokens=False)
  return ids


# Text on which transformers' own GGUF conversion and SmolLM2's pre-tokenizer agree: no run of
# whitespace before a numeral and no numerals beyond 0-9.
AGREEING_TEXTS = (
    "Hello, world!",
    "I'm sure they'll say it's fine, don't you think?",
    "12 + 34 = 46, so 3.14159 * 1,000,000 is about 3141590.",
    "Year 2025: x=7;y=-3.5e10",
    "café naïve résumé 你好 世界 🙂 Ω≈ç√",
    "tabs\t\tand   runs   of spaces   ",
    "   leading spaces",
    "def f(x):\n    return x ** 2\n\n\nprint(f(3))",
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nso 42</think>\n\n**Final Answer**\n\\boxed{42}<|endoftext|>",
)


def test_smollm2_export_matches_transformers(smollm2_tokenizers):
  out, theirs = smollm2_tokenizers
  ours = HFTokenizer(out)
  assert ours.vocab_size == len(theirs) == 49152
  for text in AGREEING_TEXTS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False), text
    assert ids == _digit_isolated_reference(theirs, text), text
    assert ours.decode(ids) == text and theirs.decode(ids) == text


def test_smollm2_digits_are_isolated_after_whitespace_runs(smollm2_tokenizers):
  # SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split every digit off
  # before the GPT-2 regex runs, so "  " before a digit stays one "ĠĠ" token. transformers 5.24's
  # GGUF conversion has no rule for "smollm" and gives [x, Ġ, Ġ, 1, 2, Ġy] here instead.
  out, theirs = smollm2_tokenizers
  ours = HFTokenizer(out)
  spell = lambda *pieces: [ours.token_to_id(p) for p in pieces]
  assert ours.encode("x  12 y") == spell("x", "ĠĠ", "1", "2", "Ġy")
  assert ours.encode("a\n\n1. b") == spell("a", "ĊĊ", "1", ".", "Ġb")
  assert ours.encode("½ ² ٣") == _digit_isolated_reference(theirs, "½ ² ٣")
  for text in ("x  12 y", "a\n\n1. First\n2. Second", "=   5", "½ ² ٣ Ⅻ", *ROUND_TRIP_TEXTS):
    ids = ours.encode(text)
    assert ids == _digit_isolated_reference(theirs, text), text
    assert ours.decode(ids) == text


def test_smollm2_special_tokens(smollm2_tokenizers):
  out, _ = smollm2_tokenizers
  ours = HFTokenizer(out)
  # The instruct model ends its turn with <|im_end|> (the GGUF's eos id 2, what its chat
  # template writes after each message); <|endoftext|> (id 0) is the pretraining document end.
  assert ours.eos_id == ours.token_to_id("<|im_end|>") == 2
  assert ours.token_to_id("<|endoftext|>") == 0
  assert ours.bos_id == ours.token_to_id("<|im_start|>") == 1
  assert ours.pad_id == 2
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    conf = json.load(f)
  assert (conf["eos_token"], conf["pad_token"], conf["bos_token"]) == (
      "<|im_end|>", "<|im_end|>", "<|im_start|>")
  assert "<|im_start|>" in conf["chat_template"]
  # Special tokens stay whole and decode back to themselves.
  assert ours.encode("<|im_end|>") == [2] and ours.decode([1, 2]) == "<|im_start|><|im_end|>"
  # No </think> in the vocabulary: it ends as a multi-token sequence.
  assert ours.token_to_id("</think>") is None
  assert ours.think_end_ids == tuple(ours.encode("</think>"))
  assert [ours.decode([i]) for i in ours.think_end_ids] == ["</", "think", ">"]
  assert ours.encode("so 42.</think>")[-3:] == list(ours.think_end_ids)
  # Without the tokenizer_config.json the names are looked up in EOS_NAMES order.
  os.remove(os.path.join(out, "tokenizer_config.json"))
  try:
    bare = HFTokenizer(os.path.join(out, "tokenizer.json"))
    assert bare.eos_id == 2 and bare.pad_id == 0 and bare.bos_id is None
  finally:
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump(conf, f)


def test_tokenizer_export_errors(tmp_path):
  import gguf

  path = str(tmp_path / "sp.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_tokenizer_model("llama")
  w.add_token_list(["<unk>", "a"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(CheckpointError, match="only byte-level BPE") as e:
    checkpoint.tokenizer_from_gguf(path, str(tmp_path / "out"))
  assert path in str(e.value)


# ---------------------------------------------------------------------------------------------
# Prompt templates (SPEC §4).

QUESTION = "What is 2 + 3?"
SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."


def test_templates_produce_spec_strings():
  assert tokenizer.get_template("r1_distill")(QUESTION) == (
      "<｜begin▁of▁sentence｜><｜User｜>What is 2 + 3? Let's think step by step and output the "
      "final answer within \\boxed{}.<｜Assistant｜><think>\n")
  assert tokenizer.get_template("chatml")(QUESTION) == (
      "<|im_start|>user\n" + QUESTION + SUFFIX + "<|im_end|>\n<|im_start|>assistant\n<think>\n")
  assert tokenizer.get_template("plain")(QUESTION) == QUESTION + "\n<think>\n"
  assert tokenizer.INSTRUCTION == SUFFIX
  with pytest.raises(ValueError, match="unknown prompt template"):
    tokenizer.get_template("alpaca")


def test_chatml_template_tokens_for_smollm2(smollm2_tokenizers):
  ours = HFTokenizer(smollm2_tokenizers[0])
  ids = ours.encode(tokenizer.chatml_template(QUESTION))
  assert ids[0] == ours.token_to_id("<|im_start|>")
  assert ids.count(ours.eos_id) == 1  # The user turn's <|im_end|>.
  assert ours.decode(ids).endswith("<|im_start|>assistant\n<think>\n")
