import sys

from bcpc.cli import main

sys.exit(main())
