"""Stable import path `brpo.sampling` for scripts outside the repo: the code lives in `brpo.rollout.sampling`."""

from brpo.rollout.sampling import *  # noqa: F401,F403
