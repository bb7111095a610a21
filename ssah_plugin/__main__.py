import sys

from ssah_plugin.cli import main

sys.exit(main())
