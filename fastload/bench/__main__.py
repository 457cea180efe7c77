import sys

from fastload.bench import main

sys.exit(main())
