"""``python -m queuebert_cli``: the ``queuebert`` command, for a child process started with the
current interpreter (the supervisor's workers, ``queuebert run``'s, the tests')."""

import sys

from queuebert_cli.main import main

sys.exit(main())
