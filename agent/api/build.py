"""Generates the gRPC/protobuf stubs in agent/api from proto/ (run by the build, not by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
PROTO_ROOT = API_DIR.parent.parent / "proto"
PROTO_FILE = PROTO_ROOT / "podfence" / "v1" / "podfence.proto"


def generate() -> int:
    from grpc_tools import protoc  # build-time dependency only

    out = API_DIR
    targets = [out / "podfence_pb2.py", out / "podfence_pb2_grpc.py"]
    if all(t.exists() and t.stat().st_mtime >= PROTO_FILE.stat().st_mtime for t in targets):
        return 0
    # Compile from the file's own directory so the generated modules import each other flatly,
    # then make the grpc module's import package-relative.
    proto_dir = PROTO_FILE.parent
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_FILE),
        ]
    )
    if rc != 0:
        return int(rc)
    grpc_mod = out / "podfence_pb2_grpc.py"
    text = grpc_mod.read_text()
    grpc_mod.write_text(text.replace("import podfence_pb2 as", "from agent.api import podfence_pb2 as"))
    return 0


if __name__ == "__main__":
    sys.exit(generate())
