"""What several test modules share. Test modules import this (and get fixtures from conftest.py),
never each other."""

from __future__ import annotations

import os
import time
from pathlib import Path

from server.registry import Entry, Registry

ROOT = Path(__file__).resolve().parents[1]

# Stand-in replicas of one service, as the unit tests publish them.
MODEL = "stand-in-model"
NAMESPACE, SERVICE = "run1", "policy"


def entry(replica: int, port: int = 9, namespace: str = NAMESPACE, service: str = SERVICE, **kw) -> Entry:
    """A ready, freshly heartbeating registry entry for a replica on 127.0.0.1 (``kw`` overrides)."""
    return Entry(
        namespace=namespace, service=service, replica=replica, model=MODEL, host="127.0.0.1", port=port,
        engine="stand-in", engine_version="0", job_id=f"test-{replica}", node="localhost", pid=os.getpid(),
        **{"state": "ready", "heartbeat_at": time.time(), **kw},
    )


def publish(root: Path, servers: list) -> list[Entry]:
    """Publishes servers (anything with a ``port``) as replicas 0, 1, ... of the service."""
    registry = Registry(root)
    entries = [entry(replica, server.port) for replica, server in enumerate(servers)]
    for e in entries:
        registry.publish(e)
    return entries
