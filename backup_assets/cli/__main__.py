"""`python -m backup_assets.cli`."""

import sys

from backup_assets.__main__ import exiting
from backup_assets.cli import main

try:
    code = main()
finally:
    exiting()
sys.exit(code)
