"""`python -m analysis_daemon ...`: the same as the `analysis-daemon` command (see cli.py)."""
import sys

from .cli import main

sys.exit(main())
