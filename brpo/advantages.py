"""Stable import path `brpo.advantages` for scripts outside the repo: the code lives in `brpo.core.advantages`."""

from brpo.core.advantages import *  # noqa: F401,F403
