"""The ops the NumPy engine runs, by the name other modules import: those of fast.py.

reference.py holds the same forward/backward pairs in the plainest NumPy, for reading;
the tests hold the two equal.
"""
from .fast import *  # noqa: F401,F403
