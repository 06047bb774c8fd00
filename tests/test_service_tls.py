"""TCP is served only with TLS (mTLS with a CA) or an explicit --insecure; a TCP client authenticates with a
pre-authorized token (there is no fd side channel over TCP)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest

import devrep
from devrep.client import connect
from devrep.engine import Replicator
from devrep.service import TlsFiles, TokenStore, build_server

pytestmark = pytest.mark.timeout(60)
TOKEN = "tls-test-token-0123456789abcdef"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=devrep-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=d)
    return d


def test_plain_tcp_is_refused_without_insecure() -> None:
    with pytest.raises(devrep.InvalidArgumentError, match="TLS"):
        build_server("127.0.0.1:0", replicator=Replicator())


def test_mtls_tcp_with_a_pre_authorized_token(pki: Path, tmp_path: Path) -> None:
    tokens = TokenStore()
    tokens.add(TOKEN, "remote")
    # A pre-authorized session over TCP has no uid: it opens paths as nobody (docs/security.md), so the file must
    # be reachable by anyone (pytest's tmp_path lies under a 0700 directory).
    public = Path(tempfile.mkdtemp(prefix="devrep-tls-"))
    public.chmod(0o755)
    server = build_server("127.0.0.1:0", replicator=Replicator(), tokens=tokens,
                          tls=TlsFiles(pki / "server.pem", pki / "server.key", pki / "ca.pem"))
    server.start()
    try:
        address = f"localhost:{server.port}"
        creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes(),
                                             private_key=(pki / "client.key").read_bytes(),
                                             certificate_chain=(pki / "client.pem").read_bytes())
        path = public / "data.bin"
        path.write_bytes(b"z" * 10000)
        path.chmod(0o644)
        with connect(address, token=TOKEN, credentials=creds, timeout=10) as client:
            assert client.stats().session_id
            client.register_file("remote/data", path)
            report = client.replicate("remote/data", ["cpu:0"])
            assert report.pages_copied == 3
            lease = client.acquire("remote/data", "cpu:0")
            assert lease.export_kind == "fd" and lease.generation == 0
            with pytest.raises(devrep.FailedPreconditionError, match="side channel"):
                _ = lease.array  # the fd cannot cross TCP
            lease.release()
        # without a client certificate the handshake fails
        anon = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
        with pytest.raises(devrep.DevrepError):
            connect(address, token=TOKEN, credentials=anon, timeout=3)
    finally:
        server.stop(1.0)
        shutil.rmtree(public, ignore_errors=True)
