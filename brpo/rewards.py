"""Stable import path `brpo.rewards` for scripts outside the repo; the code is `brpo.grading`."""

from brpo.grading import *  # noqa: F401,F403
from brpo.grading import __all__  # noqa: F401
