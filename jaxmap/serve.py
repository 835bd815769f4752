"""``python -m jaxmap.serve``: the command lives in :mod:`jaxmap.cli.serve`."""

import sys

from jaxmap.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
