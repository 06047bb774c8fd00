"""Pre-authorized tokens from a directory: a new file is accepted at once, a removed one is revoked at once (new
calls UNAUTHENTICATED, the live session that used it ended with its regions, replicas and leases)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _devrep_service import inproc_server, short_tmpdir
from _support import wait_for

from devrep.client import UnauthenticatedError, connect
from devrep.service import TokenStore

pytestmark = pytest.mark.timeout(60)
TOKEN = "pod-token-0123456789abcdef"


def write_token(directory: Path, label: str, token: str) -> Path:
    tmp = directory / f".tmp-{label}"
    tmp.write_text(token + "\n")
    os.replace(tmp, directory / label)  # atomic, as the device plugin writes them
    return directory / label


def test_removed_token_file_ends_its_live_session() -> None:
    with short_tmpdir() as tokens_dir, inproc_server(tokens=TokenStore(tokens_dir)) as server:
        write_token(tokens_dir, "pod-a", TOKEN)  # after start: no rescan delay for a new file
        other = write_token(tokens_dir, "pod-b", TOKEN + "-b")
        client = connect(server.address, token=TOKEN, timeout=10)
        bystander = connect(server.address, token=TOKEN + "-b", timeout=10)
        try:
            region = client.create_region("r", 8 * 4096)
            region.array[:] = 7
            region.invalidate()
            client.replicate("r", ["cpu:0"])
            lease = client.acquire("r", "cpu:0")
            assert np.array_equal(lease.array, region.array)
            bystander.create_region("keep", 4096)
            (session,) = [s for s in server.registry.sessions() if s.token == TOKEN]
            assert session.leases and session.regions

            (tokens_dir / "pod-a").unlink()
            # The watch ends the session without any call using the token...
            wait_for(lambda: session.closed, "the session's close (1 s after its token's removal)", 1.0, 0.01)
            assert not session.leases and not session.regions
            assert [r.name.partition("/")[2] for r in server.replicator.regions()] == ["keep"]  # keys: <session>/<name>
            # ...and a new call with it is refused.
            with pytest.raises(UnauthenticatedError):
                client.list_regions()
            assert [r.name for r in bystander.list_regions()] == ["keep"]  # other tokens unaffected
            with pytest.raises(UnauthenticatedError):  # the server already dropped it; the client unmaps anyway
                lease.release()
            assert lease.released
            assert other.exists()
        finally:
            client.close()
            bystander.close()


def test_lookup_sees_removal_without_the_watch() -> None:
    # No watch thread: every lookup stats the directory, so a removal is seen by the very next call.
    with short_tmpdir() as tokens_dir:
        store = TokenStore(tokens_dir)
        revoked: list[set[str]] = []
        store.on_revoke(revoked.append)
        assert store.lookup(TOKEN) is None
        write_token(tokens_dir, "pod-a", TOKEN)
        assert store.lookup(TOKEN) == "pod-a"
        for _ in range(3):  # remove and re-add within the same timestamp tick, repeatedly
            (tokens_dir / "pod-a").unlink()
            assert store.lookup(TOKEN) is None
            write_token(tokens_dir, "pod-a", TOKEN)
            assert store.lookup(TOKEN) == "pod-a"
        assert revoked == [{TOKEN}] * 3
        store.add(TOKEN + "-mem", "in-process")
        store.remove(TOKEN + "-mem")
        assert revoked[-1] == {TOKEN + "-mem"} and store.lookup(TOKEN + "-mem") is None


def test_watch_survives_the_directory_being_replaced() -> None:
    with short_tmpdir() as root:
        tokens_dir = root / "tokens"
        store = TokenStore(tokens_dir).start()  # the directory does not exist yet
        revoked: list[set[str]] = []
        store.on_revoke(revoked.append)
        try:
            tokens_dir.mkdir()
            write_token(tokens_dir, "pod-a", TOKEN)
            wait_for(lambda: store.known(TOKEN) == "pod-a", "pod-a's token known", 2.0, 0.01)
            (tokens_dir / "pod-a").unlink()
            tokens_dir.rmdir()
            wait_for(lambda: revoked == [{TOKEN}], "the token revoked", 2.0, 0.01)
            tokens_dir.mkdir()
            write_token(tokens_dir, "pod-b", TOKEN)
            wait_for(lambda: store.known(TOKEN) == "pod-b", "pod-b's token known", 2.0, 0.01)
        finally:
            store.close()
        assert not store.watching
