"""`python -m plmtool <group> <command> [hydra overrides]`: the `plmtool` command (plmtool.cli).

Useful where the console script is not installed, e.g. a checkout on PYTHONPATH."""

import sys

from plmtool.cli import main

if __name__ == "__main__":
    sys.exit(main())
