"""`python -m fastload.cli ...`: the same as the `fastload` command."""

import sys

from fastload.cli.commands import main

sys.exit(main())
