"""``python -m jaxmap.generate``: the command lives in :mod:`jaxmap.cli.generate`."""

from jaxmap.cli.generate import exit_process, main

if __name__ == "__main__":
    exit_process(main())
