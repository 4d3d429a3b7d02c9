"""``python -m prism_lightning``: the libraries are quieted first (unless ``--verbose``), then the CLI runs."""

import sys

from prism_lightning.quiet import configure


def run() -> None:
    """Entry point of ``python -m prism_lightning`` and the ``prism-lightning`` script."""
    configure("--verbose" in sys.argv)  # before the libraries are imported (``main`` takes the flag out)
    from prism_lightning.cli import main

    main()


if __name__ == "__main__":
    run()
