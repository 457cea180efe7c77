"""Run the fastload benchmark from a checkout: `python benchmarks/run.py --help` (as `python -m fastload.bench`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastload.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
