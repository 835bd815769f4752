"""``python -m jaxmap.bench``: the command lives in :mod:`jaxmap.cli.bench`."""

import sys

from jaxmap.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
