"""``python -m jaxmap.generate``: the command lives in :mod:`jaxmap.cli.generate`."""

from jaxmap.cli.common import exit_process
from jaxmap.cli.generate import main

if __name__ == "__main__":
    exit_process(main())
