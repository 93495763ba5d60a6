"""``python -m hyperinf_ext``: the same command line as the ``hyperinf-ext`` script."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
