import sys

from fastmeta.cli import main

sys.exit(main())
