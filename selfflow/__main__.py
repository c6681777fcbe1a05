import sys

from selfflow.cli import main

sys.exit(main())
