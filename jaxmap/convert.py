"""``python -m jaxmap.convert``: the command lives in :mod:`jaxmap.cli.convert`."""

import sys

from jaxmap.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
