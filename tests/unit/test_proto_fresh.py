"""The committed gRPC/protobuf modules match proto/ (regenerate with
``python -m supervisor.proto_gen`` after editing a .proto file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.proto_gen import ROOT, generate

pytest.importorskip("grpc_tools")


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    assert generated, "protoc produced nothing"
    committed_dir = ROOT / "supervisor" / "v1"
    for path in generated:
        committed = committed_dir / path.name
        assert committed.exists(), f"{path.name} is generated but not committed"
        assert committed.read_text() == path.read_text(), (
            f"supervisor/v1/{path.name} is stale: run `python -m supervisor.proto_gen`")
