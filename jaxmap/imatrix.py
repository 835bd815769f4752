"""``python -m jaxmap.imatrix``: the command lives in :mod:`jaxmap.cli.imatrix`."""

import sys

from jaxmap.cli.imatrix import main

if __name__ == "__main__":
    sys.exit(main())
