"""Locate safety-critical units: statistics of a model's units on safety and utility data, scores, classes."""
from ssah_plugin.locate.runner import *  # noqa: F401,F403  (split into modules by issue 12)
from ssah_plugin.locate.runner import __all__  # noqa: F401
