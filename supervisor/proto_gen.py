"""Generates the gRPC/protobuf modules from proto/ (developer tool).

The generated modules live in ``supervisor/v1/`` and are committed, so that an
install needs no protoc; ``tests/unit/test_proto_fresh.py`` fails when they are
stale. Run ``python -m supervisor.proto_gen`` after editing a .proto file.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated modules under ``out_dir`` and returns their paths."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev dependency only

    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "supervisor" / "v1").glob("*.py*"))


def main() -> None:
    generate(ROOT)
    print("generated into", ROOT / "supervisor" / "v1", file=sys.stderr)


if __name__ == "__main__":
    main()
