"""Attacks used by ``test_harness.py`` to check the harness itself."""

from __future__ import annotations

import os
from typing import Any


def whoami() -> dict[str, Any]:
    return {"uids": list(os.getresuid()), "gids": list(os.getresgid()), "groups": sorted(os.getgroups())}


def ping(address: str) -> str:
    import devrep.client

    with devrep.client.connect(address) as client:
        return client.ping()
