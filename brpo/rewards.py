"""Stable import path `brpo.rewards` for scripts outside the repo: the code lives in `brpo.grading.rewards`."""

from brpo.grading.rewards import *  # noqa: F401,F403
