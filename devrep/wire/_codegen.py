"""Regenerate the committed gRPC stubs in ``devrep/wire/_gen`` from ``protos/devrep/v1/devrep.proto``.

``python -m devrep.wire._codegen`` rewrites them; ``generate(dir)`` writes them elsewhere (the freshness
test diffs the two). protoc names the modules after the proto path (``devrep.v1``), which would clash with
this package, so the stubs are flattened into one folder and their import made relative.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
PROTO = "devrep/v1/devrep.proto"
GEN_DIR = Path(__file__).resolve().parent / "_gen"
FILES = ("devrep_pb2.py", "devrep_pb2.pyi", "devrep_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) and write the flattened stubs into ``out_dir``."""
    from grpc_tools import protoc  # test-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                          f"--grpc_python_out={tmp}", str(PROTO_DIR / PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed with status {rc}")
        written = []
        for name in FILES:
            text = (Path(tmp) / "devrep" / "v1" / name).read_text()
            text = text.replace("from devrep.v1 import devrep_pb2", "from . import devrep_pb2")
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    init = out_dir / "__init__.py"
    init.write_text('"""Generated from protos/devrep/v1/devrep.proto by devrep.wire._codegen; do not edit."""\n')
    return [init, *written]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else GEN_DIR):
        print(path)
