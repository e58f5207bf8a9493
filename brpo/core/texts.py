"""The texts SPEC §4 inserts after a cut, written once for decoding, training data and grading.

A running (cut) thinking gets ELLIPSIS_TEXT, the end-of-thinking token, then ANSWER_MARKER; a
thinking that ended with `</think>` gets ANSWER_MARKER alone.
"""

# The tokens' names, as models.tokenizer spells them (tests/test_budgets.py checks they agree;
# written out so that grading workers need not import the tokenizers).
THINK_START = "<think>"
THINK_END = "</think>"

ELLIPSIS_TEXT = "...\n\n...\n\n"  # after a cut, before the end-of-thinking token(s)
FINAL_ANSWER = "**Final Answer**"
ANSWER_MARKER = "\n\n" + FINAL_ANSWER + "\n"  # before every summary
CUT_TEXT = ELLIPSIS_TEXT + THINK_END  # what follows a cut thinking, up to the answer marker
