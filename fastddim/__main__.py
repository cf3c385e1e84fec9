"""``python -m fastddim ...``: the same as the ``fastddim`` command (see fastddim/cli/)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
