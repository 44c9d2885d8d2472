"""``python -m swapserve.cli``: the same as the ``swapserve`` command."""
import sys

from swapserve.cli import main

sys.exit(main())
