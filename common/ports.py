"""A free TCP port, for the process groups and stores that a node serves."""

from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A TCP port free on `host` (all interfaces by default) now; call it on the node that will listen on it."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
