"""``python -m jaxmap.bench_load``: the command lives in :mod:`jaxmap.cli.bench_load`."""

import sys

from jaxmap.cli.bench_load import main

if __name__ == "__main__":
    sys.exit(main())
