"""A free TCP port on the loopback interface, for a scratch server (a drill's recovered copy, the demo's
services): the kernel picks one nobody listens on."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
