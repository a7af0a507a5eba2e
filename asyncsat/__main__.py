"""`python -m asyncsat` runs the command line."""

from __future__ import annotations

from asyncsat.cli import main

raise SystemExit(main())
