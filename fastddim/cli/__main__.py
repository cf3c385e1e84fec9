"""``python -m fastddim.cli ...``: the same as ``python -m fastddim`` and the ``fastddim`` command."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
