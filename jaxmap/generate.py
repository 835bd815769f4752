"""``python -m jaxmap.generate``: the command lives in :mod:`jaxmap.cli.generate`."""

import sys

from jaxmap.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
