"""``python -m jaxmap.plan``: the command lives in :mod:`jaxmap.cli.plan`."""

import sys

from jaxmap.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
