"""``python -m jaxmap.launch``: the command lives in :mod:`jaxmap.cli.launch`."""

import sys

from jaxmap.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
