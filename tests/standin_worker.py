"""The stand-in worker moved to bench/standin_worker.py; this name stays for tests that import it from
tests/ or run this file as a script."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, when run as a script

from bench.standin_worker import FIXED_STREAM_PARTS, SimulatedPrefixCache, StandinWorker, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
