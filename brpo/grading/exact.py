"""The exact path: decides, in the calling process and without any timeout, what is exact and cheap.

- Integer, decimal, simple fraction and scientific-notation answers are compared as exact rationals
  (`fractions.Fraction`): "72" == "72.0" == "7.2 \\times 10^{1}", but 0.333 != 1/3.
- Identical LaTeX (after a conservative canonical spelling) is correct.
- Missing, over-long or too deeply nested answers score 0.
- Unevaluated arithmetic scores 0 against a plain-number reference: "5+7-3" or "12 \\times 3" is
  the question restated, not its answer, and math-verify would evaluate it and call it correct
  (a policy trained on the arithmetic task learned to box the question; issue #25). After an "=",
  only the right-hand side counts ("5+7-3=9" goes on to be graded).
Everything this path decides is decided by pure Python on the answer text alone, so its verdict
never depends on machine load (issue #16); only what it leaves undecided goes to `verify`.
"""

from __future__ import annotations

import fractions
import re

from brpo.grading.extract import MAX_ANSWER_CHARS

# No reference nests brackets deeper than 4, and math-verify's parser slows steeply with nesting
# (about 0.1 s per level of parentheses), so a deeper answer scores 0 without being parsed.
MAX_NESTING = 12

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(rf"[+-]?{_UNSIGNED}")
_TIMES = r"(?:\\times|\\cdot|\*|×|·)"
_SCIENTIFIC = re.compile(
    rf"([+-]?{_UNSIGNED})\s*{_TIMES}\s*10\s*\^\s*(?:\{{\s*([+-]?\d{{1,4}})\s*\}}|([+-]?\d))")
_E_NOTATION = re.compile(rf"([+-]?{_UNSIGNED})[eE]([+-]?\d{{1,4}})")
_POWER_OF_TEN = re.compile(r"([+-]?)10\s*\^\s*(?:\{\s*([+-]?\d{1,4})\s*\}|([+-]?\d))")
_FRACTION = re.compile(
    rf"([+-]?)\\[dt]?frac\s*\{{\s*([+-]?{_UNSIGNED})\s*\}}\s*\{{\s*([+-]?{_UNSIGNED})\s*\}}")
_SHORT_FRACTION = re.compile(r"([+-]?)\\[dt]?frac\s*(\d)\s*(\d)")
_SLASH_FRACTION = re.compile(rf"([+-]?{_UNSIGNED})\s*/\s*([+-]?{_UNSIGNED})")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_TRAILING_UNIT = re.compile(
    r"\s*\\(?:text|textrm|mathrm|mbox)\s*\{\s*[A-Za-z][A-Za-z .]*\}\s*$")
_TRAILING_DEGREE_OR_PERCENT = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\%|%)\s*$")
_LATEX_SPACES = re.compile(r"\\[!,;: ]|~")
# An operator between two operands ("5+7", "3 \\times (2", "2^{3}", "\\frac{1}{2}+1"): arithmetic
# left for the grader to do. Signs ("-9"), fractions and scientific notation are parsed before this.
_UNEVALUATED = re.compile(
    r"[\d)}]\s*(?:[-+*/^×÷·]|\\times|\\cdot|\\div)\s*[\d({\\.]")
_EXPONENT_LIMIT = 400  # 10^400 is still a cheap Fraction; larger goes to the symbolic path.
_MAX_NUMBER_CHARS = 200


def _parse_unsigned(text: str) -> fractions.Fraction:
  """Exact value of a matched decimal ("1,234.5" -> 2469/2)."""
  return fractions.Fraction(text.replace(",", ""))


def exact_number(text: str) -> fractions.Fraction | None:
  """The exact value of a plain numeric answer, or None if `text` is not one.

  Accepted: integers and decimals (with thousands commas "1,234.5", a sign, "$", "\\$", LaTeX
  spaces, a trailing ".", a trailing unit in \\text{...}, a trailing "%" or degree sign, both
  ignored), fractions "\\frac{a}{b}", "\\dfrac12", "a/b", and scientific notation
  "a \\times 10^{k}", "aek", "10^{k}". A comma that is not a thousands separator ("1,2") makes it
  not a number.
  """
  if not isinstance(text, str) or len(text) > _MAX_NUMBER_CHARS:
    return None
  s = text.strip().replace("\u2212", "-").replace("{,}", ",")
  s = _LATEX_SPACES.sub("", s).replace("\\$", "").replace("$", "").strip()
  for _ in range(2):
    wrapped = _TEXT_WRAP.fullmatch(s)
    if wrapped:
      s = wrapped.group(1).strip()
  s = _TRAILING_UNIT.sub("", s)
  s = _TRAILING_DEGREE_OR_PERCENT.sub("", s)
  if s.endswith(".") and not s.endswith(".."):
    s = s[:-1]
  s = s.strip()
  try:
    if _PLAIN_NUMBER.fullmatch(s):
      return _parse_unsigned(s)
    if m := _SCIENTIFIC.fullmatch(s) or _E_NOTATION.fullmatch(s):
      exponent = int(m.group(2) if m.group(2) is not None else m.group(3))
      if abs(exponent) > _EXPONENT_LIMIT:
        return None
      return _parse_unsigned(m.group(1)) * fractions.Fraction(10) ** exponent
    if m := _POWER_OF_TEN.fullmatch(s):
      exponent = int(m.group(2) if m.group(2) is not None else m.group(3))
      if abs(exponent) > _EXPONENT_LIMIT:
        return None
      return (-1 if m.group(1) == "-" else 1) * fractions.Fraction(10) ** exponent
    if m := _FRACTION.fullmatch(s) or _SHORT_FRACTION.fullmatch(s):
      sign = -1 if m.group(1) == "-" else 1
      return sign * _parse_unsigned(m.group(2)) / _parse_unsigned(m.group(3))
    if m := _SLASH_FRACTION.fullmatch(s):
      return _parse_unsigned(m.group(1)) / _parse_unsigned(m.group(2))
  except (ZeroDivisionError, ValueError):
    return None
  return None


_CANON_DROP = re.compile(r"\\left\b|\\right\b|\\[!,;: ]|~|\$")
# A space matters only between two letters ("\cot x" is not "\cotx"; "2 x" is "2x").
_CANON_SPACE = re.compile(r"(?<![A-Za-z]) | (?![A-Za-z])")


def _canonical(text: str) -> str:
  """A spelling of a LaTeX answer where equal strings mean equal answers (cheap, conservative)."""
  s = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = " ".join(_CANON_DROP.sub(" ", s).split())
  return _CANON_SPACE.sub("", s).rstrip(".")


_BRACKET_TOKEN = re.compile(r"\\.|[{}()\[\]]", re.DOTALL)


def _nesting_depth(text: str) -> int:
  """How deep (), [] and {} nest in `text` (escaped characters do not count)."""
  depth = deepest = 0
  for token in _BRACKET_TOKEN.finditer(text):
    bracket = token.group()
    if bracket in "{([":
      depth += 1
      deepest = max(deepest, depth)
    elif bracket in "})]":
      depth -= 1
  return deepest


def fast_verdict(answer: str | None,
                 golds: tuple[str, ...]) -> tuple[float | None, tuple[str, ...]]:
  """Decides an answer without the symbolic parser where that is exact and cheap.

  Returns:
    (verdict, undecided): verdict 1.0/0.0 when decided; else None and the references that still
    need a symbolic comparison.
  """
  if answer is None or not answer or len(answer) > MAX_ANSWER_CHARS:
    return 0.0, ()
  if _nesting_depth(answer) > MAX_NESTING:
    return 0.0, ()
  value = exact_number(answer)
  canonical = _canonical(answer)
  if (value is None and _UNEVALUATED.search(answer.rsplit("=", 1)[-1])
      and all(exact_number(gold) is not None for gold in golds)):
    return 0.0, ()
  undecided = []
  for gold in golds:
    if _canonical(gold) == canonical:
      return 1.0, ()
    gold_value = exact_number(gold)
    if value is not None and gold_value is not None:
      if value == gold_value:
        return 1.0, ()
      continue
    undecided.append(gold)
  if not undecided:
    return 0.0, ()
  return None, tuple(undecided)

