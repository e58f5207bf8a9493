# %% [markdown]
# # Quickstart: anytime reasoning on the tiny task
#
# A notebook in "percent" form, runnable as a script (`python experiments/quickstart.py`). It
# loads the warm-started tiny model (training it once,
# about 2 minutes on 2 CPU cores), samples thinkings, cuts them at several budgets, forces a
# summary at each cut, grades them, and shows the accuracy-against-budget table and plot.
#
# The same notebook as `experiments/quickstart.ipynb` (generated from this file by
# `python experiments/make_notebook.py`; a test keeps the two in sync), which opens in Colab:
# choose a runtime (Runtime > Change runtime type: CPU is enough for the tiny model; on a GPU or
# TPU runtime install the matching jax first, see the README), then run the install cell.

# %%
import dataclasses
import os


def find_root(start: str) -> str:
  """The repository root: `start` or the nearest folder above it holding experiments/configs."""
  here = os.path.abspath(start)
  while not os.path.isdir(os.path.join(here, "experiments", "configs")):
    if os.path.dirname(here) == here:
      raise SystemExit(f"{start}: not inside the repository (no experiments/configs above it); "
                       "start Jupyter or the script inside the repository")
    here = os.path.dirname(here)
  return here


# Paths in the flags (and the flagfiles each other includes) are relative to the repository root:
# find it from this file, or in Jupyter (no __file__) from the working directory, the notebook's
# folder (in Colab the install cell clones the repository and changes into it), and run from there.
OUT = os.environ.get("QUICKSTART_OUT")  # where the plot goes (default: workdir/ in the root)
OUT = os.path.abspath(OUT) if OUT else None  # from where it was given, before the chdir
ROOT = find_root(os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals()
                 else os.getcwd())
os.chdir(ROOT)

import jax  # noqa: E402

from brpo.grading import Grader  # noqa: E402
from brpo.rollout import anytime as at  # noqa: E402
from brpo.rollout import sampling  # noqa: E402
from brpo.run import evaluation, runner, scoring  # noqa: E402
from brpo.run import flags as flags_lib  # noqa: E402
from brpo.tasks import data as data_lib  # noqa: E402

# The embedded default's configuration; QUICKSTART_FLAGS (space separated) overrides flags, e.g.
# a smaller warm start for a quick look.
FLAGS = ["--flagfile=experiments/configs/tiny_cpu.flags", "--progress=false",
         *os.environ.get("QUICKSTART_FLAGS", "").split()]
ec = flags_lib.config_from_args(FLAGS, relative_to=ROOT)
# The warm start lives under the repository root, wherever this runs from.
ec = dataclasses.replace(ec, run=dataclasses.replace(
    ec.run, warmstart_dir=os.path.join(ROOT, ec.run.warmstart_dir)))
N_QUESTIONS = int(os.environ.get("QUICKSTART_QUESTIONS", "64"))

# %% [markdown]
# ## The model
# `runner.load_model` reads the warm start that the repository ships in `--warmstart_dir`
# (experiments/warmstarts/tiny_arith; a folder without one is trained into the first time): a
# 2-layer decoder and a character-level SentencePiece tokenizer, trained on the task's traces.

# %%
cfg, params, tokenizer = runner.load_model(ec)
toks = at.AnytimeTokens.from_tokenizer(tokenizer)
n_params = sum(x.size for x in jax.tree.leaves(params))
print(f"{n_params:,} parameters; vocabulary {tokenizer.vocab_size}; max_seq_len {cfg.max_seq_len}")

# %% [markdown]
# ## Anytime decoding on a few questions
# One thinking per question up to b_max tokens, cut at four budgets; at each cut the text
# `</think>\n\n**Final Answer**\n` is inserted (unless the thinking already closed) and a short
# summary is sampled. All cuts of a thinking read its one KV cache.

# %%
examples = data_lib.load_dataset("arith:test:n=256")[:N_QUESTIONS]
prompts, refs, _ = runner.encode_prompts(examples, tokenizer, ec.model.template,
                                         ec.model.max_prompt_len, "skip", "arith:test")
budgets = ec.rl.budget_spec.budgets
spec = at.AnytimeConfig(budgets=budgets, group_size=1, n_summaries=1,
                        summary_len=ec.rl.summary_len)
greedy = sampling.make_strategy(0.0, 1.0)
ro = at.anytime_rollout(params, cfg, prompts[:3], spec, toks, jax.random.PRNGKey(0),
                        think_strategy=greedy, summary_strategy=greedy)
with Grader(num_workers=1) as grader:
  rewards = scoring.score_rollout(ro, tokenizer, toks, refs[:3], grader)  # [R, m, A]
texts = {(r, j): (think, summary) for r, j, _, think, summary, _ in
         scoring.rollout_texts(ro, tokenizer, toks)}
for r in range(3):
  print(f"\n=== {examples[r].question}   (answer {refs[r]})")
  for j, b in enumerate(budgets):
    think, summary = texts[(r, int(ro.cuts.canonical[r, j]))]
    print(f"--- budget {b}: reward {rewards[r, j, 0]:.0f}")
    print(f"{think[-60:]!r} -> {summary.strip()!r}")

# %% [markdown]
# ## Accuracy against budget
# `evaluation.evaluate` does the same for every question with temperature 0.6 and 32 budgets:
# one thinking per question cut 32 ways. The anytime score is the mean over budgets.

# %%
with Grader(num_workers=1) as grader:
  result = evaluation.evaluate(
      params, cfg, tokenizer, toks, prompts, refs,
      budgets=evaluation.eval_budgets(ec.rl.b_max, ec.eval.n_budgets),
      summary_len=ec.rl.summary_len, temperature=ec.eval.temperature, grader=grader,
      rng=jax.random.PRNGKey(1), progress=False)
print(evaluation.budget_table(result))
out = OUT or os.path.join(ROOT, "workdir")
os.makedirs(out, exist_ok=True)
plot = evaluation.plot_accuracy({"warm start": result}, os.path.join(out, "quickstart_accuracy.png"))
print("plot:", plot)
try:  # In Jupyter (IPython), show it here; a plain script only prints its path.
  from IPython import get_ipython
  from IPython.display import Image, display
except ImportError:
  get_ipython = None
if get_ipython is not None and get_ipython() is not None:
  display(Image(filename=plot))

# %% [markdown]
# ## Next
# `python experiments/gsm_math.py --flagfile=experiments/configs/tiny_cpu.flags` trains this
# model with AR-uniform RL (BRPO) for 30 steps and evaluates it the same way; `rl.rl_step` is one
# step of it: rollout, grading, advantages, packing, PPO update.
