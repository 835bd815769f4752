"""``python -m jaxmap.tune``: the command lives in :mod:`jaxmap.cli.tune`."""

import sys

from jaxmap.cli.tune import main

if __name__ == "__main__":
    sys.exit(main())
