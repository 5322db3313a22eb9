"""Named points where the fault-injection tests kill this process (kill -9) at an exact moment.

Inactive unless BACKUP_ASSETS_FAILPOINTS lists the point (comma-separated), which only the test
suite sets in the child processes it starts. Random-time kills cover the rest; these make the
narrow windows (a restore's swap, the gap between an artifact and its manifest) reproducible.
"""

from __future__ import annotations

import os
import signal

ENV = "BACKUP_ASSETS_FAILPOINTS"


def point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
