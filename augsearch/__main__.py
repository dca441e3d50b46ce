import sys

from augsearch.cli import main

sys.exit(main())
