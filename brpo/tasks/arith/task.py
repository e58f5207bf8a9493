"""The synthetic task of the CPU default run: chains of additions and subtractions, step by step.

Makes the questions, their gold thinking traces and a character-level SentencePiece tokenizer.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import string
import zlib
from typing import Sequence

import numpy as np

from brpo.core.texts import ANSWER_MARKER as ANSWER_PREFIX
from brpo.core.texts import CUT_TEXT
from brpo.tasks.example import Example
from models import tokenizer as tok_lib

# Pieces the tokenizer keeps whole. SentencePiece matches user pieces after turning spaces into
# "▁", so the piece that covers "**Final Answer**" has to be spelled with it.
USER_PIECES = (tok_lib.THINK_START, tok_lib.THINK_END, "**Final\u2581Answer**", "\\boxed{")
UNK_ID, PAD_ID, EOS_ID = 0, 1, 2

# Thinking lengths in tokens (characters, without `</think>`) of the default task (3-6 one-digit
# terms, each redundant line with probability 0.5), over 3,000 questions, from `length_table`:
#   terms     3    4    5    6
#   mean     25   35   44   54
#   p90      38   50   62   72
#   max      40   52   64   76
# A step line is 5-7 tokens; the two redundant lines add 2 * terms + 12 together. Overall mean 39:
# with b_max = 96 and m = 4, the thinking (with its `</think>`) is longer than 24 tokens in 84%
# of cases, than 48 in 32%, than 72 in 4%. Whole training traces are 62 tokens on average, 102
# at most. Each extra term adds ~10 tokens (7 terms: mean 62, 8 terms: mean 73).


@dataclasses.dataclass(frozen=True)
class ArithTask:
  """Difficulty and trace style of the task.

  Attributes:
    min_terms, max_terms: the number of terms, uniform in [min_terms, max_terms].
    digits: each term is uniform in [1, 10**digits - 1].
    p_restate: probability that the thinking opens by restating the question ("sum 37+18-5").
    p_check: probability that it closes with a "check" line restating question and result.
  The two redundant lines carry no new information; they are what anytime training can learn to
  drop. Being random in the warm-start traces, dropping them is a choice the policy can explore.
  """

  # The default is what the tiny model learns in the warm-start budget (~2 minutes). Two-digit
  # terms are not learnt in time (a 2-layer model stayed under 5% after 1,500 steps). Trained on
  # 3-8 terms, greedy accuracy fell with the chain: 90, 54, 24, 10, 3, 5% for 3 ... 8 terms.
  min_terms: int = 3
  max_terms: int = 6
  digits: int = 1
  p_restate: float = 0.5
  p_check: float = 0.5

  def __post_init__(self):
    if not 2 <= self.min_terms <= self.max_terms:
      raise ValueError(f"ArithTask: need 2 <= min_terms <= max_terms, got {self.min_terms}, "
                       f"{self.max_terms}")
    if not 1 <= self.digits <= 6:
      raise ValueError(f"ArithTask: digits={self.digits} must be in [1, 6]")
    for name in ("p_restate", "p_check"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"ArithTask: {name}={getattr(self, name)} must be in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Questions and traces.

_QUESTION = re.compile(r"^\d+([+-]\d+)+=\?$")


def make_terms(rng: np.random.Generator, task: ArithTask) -> list[int]:
  """Signed terms of one chain; the running sum never goes below zero."""
  k = int(rng.integers(task.min_terms, task.max_terms + 1))
  hi = 10 ** task.digits
  terms = [int(rng.integers(1, hi))]
  total = terms[0]
  for _ in range(k - 1):
    t = int(rng.integers(1, hi))
    if t <= total and rng.random() < 0.5:
      t = -t
    terms.append(t)
    total += t
  return terms


def expression(terms: Sequence[int]) -> str:
  """[37, 18, -5, 22] -> "37+18-5+22"."""
  return str(terms[0]) + "".join(f"+{t}" if t >= 0 else f"-{-t}" for t in terms[1:])


def question_text(terms: Sequence[int]) -> str:
  return expression(terms) + "=?"


def parse_question(question: str) -> list[int]:
  """"37+18-5+22=?" -> [37, 18, -5, 22]."""
  if not _QUESTION.match(question):
    raise ValueError(f"not an arith question: {question!r}")
  return [int(t) for t in re.findall(r"[+-]?\d+", question[:-2])]


def thinking_text(terms: Sequence[int], restate: bool, check: bool) -> str:
  """The gold thinking for `terms`, without the closing `</think>`.

  [37, 18, -5, 22] with both redundant lines:
    "sum 37+18-5+22\\n37+18=55\\n55-5=50\\n50+22=72\\ncheck 37+18-5+22=72\\n"
  Each step restates the running sum, so a thinking cut after any line still shows the latest
  partial result.
  """
  lines = [f"sum {expression(terms)}"] if restate else []
  total = terms[0]
  for t in terms[1:]:
    new = total + t
    lines.append(f"{total}{'+' if t >= 0 else '-'}{abs(t)}={new}")
    total = new
  if check:
    lines.append(f"check {expression(terms)}={total}")
  return "".join(line + "\n" for line in lines)


def answer_text(value: str | int) -> str:
  """The summary after ANSWER_PREFIX: "\\boxed{72}" (the end-of-sequence token follows)."""
  return f"\\boxed{{{value}}}"


@dataclasses.dataclass(frozen=True)
class Trace:
  """A full training trace in its parts; their concatenation is the text the model learns."""

  prompt: str  # the question in its template, e.g. plain: "{question}\n<think>\n"
  thinking: str  # the steps, ending with "\n"
  summary: str  # "</think>" + ANSWER_PREFIX + "\boxed{N}"; the end-of-sequence token follows

  @property
  def text(self) -> str:
    return self.prompt + self.thinking + self.summary


def gold_trace(example: Example, restate: bool, check: bool, template: str = "plain") -> Trace:
  """The gold trace of `example`, its prompt in `template` (models.tokenizer.TEMPLATES)."""
  terms = parse_question(example.question)
  return Trace(prompt=tok_lib.get_template(template)(example.question),
               thinking=thinking_text(terms, restate, check),
               summary=tok_lib.THINK_END + ANSWER_PREFIX + answer_text(example.answer))


def sample_trace(example: Example, task: ArithTask, rng: np.random.Generator,
                 template: str = "plain") -> Trace:
  """A gold trace with the redundant lines drawn with the task's probabilities."""
  return gold_trace(example, restate=bool(rng.random() < task.p_restate),
                    check=bool(rng.random() < task.p_check), template=template)


def generate(n: int, seed: int, task: ArithTask, prefix: str = "arith") -> list[Example]:
  """n examples, a deterministic function of (n, seed, task); ids are f"{prefix}-{i}"."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    terms = make_terms(rng, task)
    out.append(Example(question=question_text(terms), answer=str(sum(terms)), id=f"{prefix}-{i}"))
  return out


# ---------------------------------------------------------------------------------------------
# Data set specs: "arith:<split>[:key=value,...]".

DEFAULT_SIZES = {"train": 20_000}
DEFAULT_EVAL_SIZE = 500


def parse_spec(spec: str) -> tuple[str, int, int, ArithTask]:
  """"arith:test:n=200,terms=3-6,digits=2,seed=0" -> (split, n, seed, task).

  Keys: n (examples; 20000 for train, else 500), terms ("3-6" or "4"), digits, seed (mixed with
  the split name, so train and test differ), p_restate, p_check (these two only shape traces).
  """
  parts = spec.split(":", 2)
  if parts[0] != "arith" or len(parts) < 2 or not parts[1]:
    raise ValueError(f"bad data spec {spec!r}: expected arith:<split>[:key=value,...]")
  split = parts[1]
  n = DEFAULT_SIZES.get(split, DEFAULT_EVAL_SIZE)
  seed = 0
  fields: dict[str, object] = {}
  for item in filter(None, (parts[2] if len(parts) > 2 else "").split(",")):
    key, eq, value = item.partition("=")
    try:
      if not eq:
        raise ValueError("expected key=value")
      if key == "n":
        n = int(value)
      elif key == "seed":
        seed = int(value)
      elif key == "terms":
        lo, _, hi = value.partition("-")
        fields["min_terms"], fields["max_terms"] = int(lo), int(hi or lo)
      elif key == "digits":
        fields["digits"] = int(value)
      elif key in ("p_restate", "p_check"):
        fields[key] = float(value)
      else:
        raise ValueError("unknown key (known: n, seed, terms, digits, p_restate, p_check)")
    except ValueError as e:
      raise ValueError(f"bad data spec {spec!r}: {item!r}: {e}") from None
  if n < 1:
    raise ValueError(f"bad data spec {spec!r}: n={n} must be >= 1")
  return split, n, seed, ArithTask(**fields)


def split_seed(split: str, seed: int) -> int:
  return zlib.crc32(split.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


def load(spec: str) -> list[Example]:
  split, n, seed, task = parse_spec(spec)
  return generate(n, split_seed(split, seed), task, prefix=f"arith-{split}")


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def tokenizer_corpus(task: ArithTask, seed: int, n: int = 2000) -> list[str]:
  """Texts the tokenizer is trained on: gold traces in every style, the inserted texts, and
  the printable ASCII characters (so that any ASCII text has its own pieces)."""
  rng = np.random.default_rng(seed)
  corpus = []
  for ex in generate(n, seed, task):
    corpus.append(sample_trace(ex, dataclasses.replace(task, p_restate=0.5, p_check=0.5),
                               rng).text)
  corpus.append(CUT_TEXT + ANSWER_PREFIX)
  corpus.append(string.printable)
  return corpus


def train_tokenizer(path: str, task: ArithTask = ArithTask(),
                    seed: int = 0) -> tok_lib.SentencePieceTokenizer:
  """Trains a character-level SentencePiece model on the task's traces and writes it to `path`.

  One character per piece (max_sentencepiece_length=1) except USER_PIECES; bytes fall back to
  <0xNN> pieces, so no text maps to unk. Ids: 0 unk, 1 <pad>, 2 </s> (end of sequence), no bos.
  The same (task, seed) gives the same file.
  """
  import sentencepiece as spm

  corpus = tokenizer_corpus(task, seed)
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=512,
      hard_vocab_limit=False, max_sentencepiece_length=1, user_defined_symbols=list(USER_PIECES),
      byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, split_by_whitespace=False,
      unk_id=UNK_ID, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=-1, pad_piece="<pad>",
      eos_piece="</s>", num_threads=1, seed_sentencepiece_size=100_000, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)
  return tok_lib.SentencePieceTokenizer(path)


def encode_trace(tokenizer: tok_lib.Tokenizer, trace: Trace) -> tuple[list[int], int]:
  """-> (ids of prompt + thinking + summary + eos, prompt length in tokens).

  Parts are encoded separately, as the sampler sees them (it encodes the prompt, then samples);
  with one piece per character this equals encoding the whole text.
  """
  prompt = tokenizer.encode(trace.prompt)
  rest = tokenizer.encode(trace.thinking) + tokenizer.encode(trace.summary)
  return prompt + rest + [tokenizer.eos_id], len(prompt)


def length_table(tokenizer: tok_lib.Tokenizer, task: ArithTask, n: int = 2000,
                 seed: int = 0) -> dict[int, dict[str, float]]:
  """Thinking length in tokens (without `</think>`) per number of terms: mean, p10, p90, max."""
  rng = np.random.default_rng(seed)
  by_terms: dict[int, list[int]] = {}
  for ex in generate(n, seed, task):
    k = len(parse_question(ex.question))
    by_terms.setdefault(k, []).append(len(tokenizer.encode(sample_trace(ex, task, rng).thinking)))
  return {k: {"mean": float(np.mean(v)), "p10": float(np.percentile(v, 10)),
              "p90": float(np.percentile(v, 90)), "max": float(np.max(v)), "count": len(v)}
          for k, v in sorted(by_terms.items())}
