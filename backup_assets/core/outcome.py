"""What a check says: passed or not, one line, metadata, and whether it could run here at all. Shared by the
dump checks (verify.py) and the point-in-time checks (pitr.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backup_assets.core import crypto


@dataclass
class Outcome:
    passed: bool
    message: str
    metadata: dict[str, Any] = field(default_factory=dict)
    warn: bool = False  # a non-blocking warning rather than an error
    # the check could not run here (the key that opens the artifact is not at hand): it says nothing about
    # the backup, is never recorded over an earlier result, and is shown as not checked, not as failed
    not_checked: bool = False

    @classmethod
    def failure(cls, exc: Exception, message: str, metadata: dict[str, Any] | None = None) -> "Outcome":
        """A check that did not pass because of `exc`; not checked when `exc` is a missing key."""
        if isinstance(exc, crypto.NoIdentity):
            return cls(False, f"not checked here: {exc}", dict(metadata or {}), warn=True, not_checked=True)
        return cls(False, message, dict(metadata or {}))
