"""`python -m asyncsat` runs the command line."""

from __future__ import annotations

from asyncsat.cli import run

run()
