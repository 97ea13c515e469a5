"""Commands that live in their own rooms (report, serve) register here.

Each module named in MODULES provides `add_parser(subparsers, formatter_class)`,
which adds its subcommand, and `run(args) -> exit code`.
"""
from __future__ import annotations

import importlib

MODULES = {"report": "cnnlab.inspect.cli", "serve": "cnnlab.serve.cli",
           "import": "cnnlab.interop.cli", "export": "cnnlab.interop.cli"}
COMMANDS: dict = {}


def add_parsers(sub, fmt):
    for command, module in MODULES.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (e.name == module or module.startswith(e.name + ".")):
                continue  # that room is not installed
            raise
        mod.add_parser(sub, fmt)
        COMMANDS[command] = mod.run
