"""Keep secrets out of logs, metadata, manifests and exception text."""

from __future__ import annotations

import re

_URI_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)([^/@\s:]*)(:[^@/\s]*)?@", re.IGNORECASE)
_KEYVALUE = re.compile(r"\b(password|passwd|pwd|secret|token|PGPASSWORD)(\s*[=:]\s*)('[^']*'|\"[^\"]*\"|\S+)", re.IGNORECASE)


def scrub(text: str, *secrets: str | None) -> str:
    """Remove known secret values, URI passwords and key=value passwords from text."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URI_USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}{':***' if m.group(3) else ''}@", text)
    return _KEYVALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
