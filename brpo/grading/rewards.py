"""Former single module of grading, kept as an import path: everything lives in `brpo.grading`."""

from brpo.grading import *  # noqa: F401,F403
from brpo.grading import __all__  # noqa: F401
