import sys

from rlsparse.cli.main import main

sys.exit(main())
