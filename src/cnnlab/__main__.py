"""`python -m cnnlab ...` runs the command line (as `cnnlab ...` does)."""
from .cli import run

run()
