"""`python -m backup_assets.cli`."""

import sys

from backup_assets.cli import main

sys.exit(main())
