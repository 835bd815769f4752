"""``python -m jaxmap.quality``: the command lives in :mod:`jaxmap.cli.quality`."""

import sys

from jaxmap.cli.quality import main

if __name__ == "__main__":
    sys.exit(main())
