"""A search worker process for the multi-process tests: the real CLI, driver and storage, a synthetic session.

``python -m tests.search.worker RECIPE [secateurs search options]``; ``SECATEURS_SYNTH_DELAY`` sets the seconds
each measurement takes.
"""

import os
import sys

from search.cli import main
from tests.search.synthetic import SyntheticSession

if __name__ == "__main__":
    delay = float(os.environ.get("SECATEURS_SYNTH_DELAY", "0.2"))
    sys.exit(main(sys.argv[1:], session_factory=lambda recipe: SyntheticSession(delay=delay)))
