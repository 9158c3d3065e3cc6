"""``python -m qsilk`` — the command line (see `qsilk.cli`)."""
import sys

from .cli import main

sys.exit(main())
