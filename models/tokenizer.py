"""Tokenizers behind one small interface, and the prompt templates.

Two backends: SentencePiece `.model` files and Hugging Face `tokenizer.json` files (through the
`tokenizers` package). Special tokens (end of thinking, end of sequence, pad) are found by name.
A model whose vocabulary has no `</think>` token (e.g. SmolLM2) ends its thinking with the
multi-token encoding of "</think>": `think_end_ids` is then longer than one id, and the sampler
stops on that sequence.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

THINK_START = "<think>"
THINK_END = "</think>"
# Names tried, in order, for end of sequence and padding when the file does not say.
EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|im_end|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>")
PAD_NAMES = ("<｜▁pad▁｜>", "<|pad|>", "<pad>", "<|endoftext|>")
BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<s>", "<bos>", "<|begin_of_text|>")


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int
  pad_id: int
  bos_id: int | None
  think_end_ids: tuple[int, ...]
  think_end_variants: tuple[tuple[int, ...], ...]

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def token_to_id(self, token: str) -> int | None: ...


class _Base:
  """Shared logic: special tokens by name, `</think>` as one id or a sequence of ids."""

  def _resolve(self, eos: str | None, pad: str | None, bos: str | None, path: str):
    def find(names, explicit, what):
      if explicit is not None:
        i = self.token_to_id(explicit)
        if i is None:
          raise ValueError(f"{path}: {what} token {explicit!r} is not in the vocabulary")
        return i
      for n in names:
        i = self.token_to_id(n)
        if i is not None:
          return i
      return None

    self.eos_id = find(EOS_NAMES, eos, "end-of-sequence")
    if self.eos_id is None:
      raise ValueError(f"{path}: no end-of-sequence token found (tried {EOS_NAMES}); "
                       "pass eos=<name>")
    self.pad_id = find(PAD_NAMES, pad, "pad")
    if self.pad_id is None:
      self.pad_id = self.eos_id
    self.bos_id = find(BOS_NAMES, bos, "beginning-of-sequence")
    single = self.token_to_id(THINK_END)
    self.think_end_ids = (single,) if single is not None else tuple(self.encode(THINK_END))
    self.think_end_variants = self._think_end_variants(single)

  def _think_end_variants(self, single: int | None) -> tuple[tuple[int, ...], ...]:
    """Every token sequence that writes `</think>` after common left contexts.

    With a dedicated token there is one. Otherwise BPE merges the "</" with what precedes it
    (SmolLM2: "</" "think" ">" but " </" "think" ">"), so the sampler must stop on each form:
    for each context, the shortest token suffix of its encoding whose text holds `</think>`.
    """
    if single is not None:
      return ((single,),)
    out = []
    for left in ("", " ", "  ", "\n", "\n\n", ".", ":", ")", "x", "1", "$", "}"):
      ids = self.encode(left + THINK_END)
      for k in range(1, len(ids) + 1):
        if THINK_END in self.decode(ids[-k:]):
          if tuple(ids[-k:]) not in out:
            out.append(tuple(ids[-k:]))
          break
    return tuple(out)

  def __repr__(self):
    return (f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, "
            f"eos={self.eos_id}, pad={self.pad_id}, think_end={self.think_end_ids})")


class SentencePieceTokenizer(_Base):
  """A SentencePiece `.model` file."""

  def __init__(self, path: str, eos: str | None = None, pad: str | None = None,
               bos: str | None = None):
    import sentencepiece as spm

    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file {path} does not exist")
    self.path = path
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.Load(path)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with little context.
      raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from None
    self.vocab_size = self.sp.GetPieceSize()
    self._resolve(eos or (self.sp.IdToPiece(self.sp.eos_id()) if self.sp.eos_id() >= 0 else None),
                  pad or (self.sp.IdToPiece(self.sp.pad_id()) if self.sp.pad_id() >= 0 else None),
                  bos or (self.sp.IdToPiece(self.sp.bos_id()) if self.sp.bos_id() >= 0 else None),
                  path)

  def encode(self, text: str) -> list[int]:
    return list(self.sp.EncodeAsIds(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.DecodeIds([int(i) for i in ids])

  def token_to_id(self, token: str) -> int | None:
    i = self.sp.PieceToId(token)
    return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else int(i)


class HFTokenizer(_Base):
  """A Hugging Face `tokenizer.json` file (a file, or a folder holding one)."""

  def __init__(self, path: str, eos: str | None = None, pad: str | None = None,
               bos: str | None = None):
    import tokenizers

    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file {path} does not exist")
    self.path = path
    try:
      self.tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:
      raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    # tokenizer_config.json, when beside the file, names the special tokens.
    conf = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(conf):
      with open(conf) as f:
        c = json.load(f)
      name = lambda v: v.get("content") if isinstance(v, dict) else v
      eos = eos or name(c.get("eos_token"))
      pad = pad or name(c.get("pad_token"))
      bos = bos or name(c.get("bos_token"))
    self._resolve(eos, pad, bos, path)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    return self.tok.token_to_id(token)


def load_tokenizer(path: str, **special) -> Tokenizer:
  """Picks the backend from the path: `.model` -> SentencePiece, else tokenizer.json."""
  if path.endswith(".model"):
    return SentencePieceTokenizer(path, **special)
  return HFTokenizer(path, **special)


# ---------------------------------------------------------------------------------------------
# Prompt templates: question text -> the prompt string; the thinking starts right after it.

INSTRUCTION = " Let's think step by step and output the final answer within \\boxed{}."


def r1_distill_template(question: str) -> str:
  """DeepSeek-R1-Distill chat format (SPEC §4); the assistant turn opens with `<think>\\n`."""
  return ("<｜begin▁of▁sentence｜><｜User｜>" + question + INSTRUCTION
          + "<｜Assistant｜><think>\n")


def chatml_template(question: str) -> str:
  """ChatML (Qwen2.5-Instruct, SmolLM2-Instruct), assistant turn opened with `<think>\\n`."""
  return ("<|im_start|>user\n" + question + INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n"
          + THINK_START + "\n")


def plain_template(question: str) -> str:
  """For small models trained from scratch (the tiny task): no chat markup."""
  return question + "\n" + THINK_START + "\n"


TEMPLATES = {"r1_distill": r1_distill_template, "chatml": chatml_template,
             "plain": plain_template}


def get_template(name: str):
  if name not in TEMPLATES:
    raise ValueError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}")
  return TEMPLATES[name]
