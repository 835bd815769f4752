"""``python -m jaxmap.doctor``: the command lives in :mod:`jaxmap.cli.doctor`."""

import sys

from jaxmap.cli.doctor import main

if __name__ == "__main__":
    sys.exit(main())
