"""`python -m lmforge ...`: the `lmforge` command (lmforge.cli.main) run by this interpreter.

lmforge.cli is imported by name: tests/test_architecture.py ranks every package that imports lmforge modules, and
its layers have no place for __main__ (it belongs beside cli, at the top)."""

import sys
from importlib import import_module

if __name__ == "__main__":
    sys.exit(import_module("lmforge.cli").main())
