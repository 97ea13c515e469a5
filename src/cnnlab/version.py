"""The version of cnnlab (one place; the package and the run files read it)."""
__version__ = "0.1.0"
