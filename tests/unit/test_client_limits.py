"""The CA and metrics ports' connection limits from the descriptor budget (pure)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from supervisor.config import Config, parse_config_text
from supervisor.data.main import FD_PER_WORKER, FD_RESERVE, METRICS_CONNECTIONS, client_limits


def config(workers: list[int]) -> Config:
    text = "[supervisor]\nclient_header_timeout = \"2s\"\n" + "".join(
        f"[functions.f{i}]\nhandler = \"h:h\"\ncode_dir = \".\"\nmax_workers = {n}\nmin_warm = 0\n"
        for i, n in enumerate(workers))
    return parse_config_text(text, Path("/var/tmp"), Path("/var/tmp/supervisor.toml"))


@given(nofile=st.integers(64, 1 << 20), workers=st.lists(st.integers(1, 1000), min_size=1, max_size=5))
def test_connections_never_eat_the_planes_reserve(nofile: int, workers: list[int]) -> None:
    ca, metrics = client_limits(config(workers), nofile)
    reserve = FD_RESERVE + FD_PER_WORKER * sum(workers)
    assert 4 <= metrics.max_connections <= METRICS_CONNECTIONS
    assert ca.max_connections >= 8
    if nofile >= reserve + 8 + METRICS_CONNECTIONS:  # room for both: the reserve is kept whole
        assert ca.max_connections + metrics.max_connections + reserve <= nofile
    assert ca.header_timeout_s == metrics.header_timeout_s == 2.0


def test_a_typical_container() -> None:
    ca, metrics = client_limits(config([4]), 1024)
    assert (ca.max_connections, metrics.max_connections) == (1024 - 128 - 16 - 64, 64)
    ca_unlimited, _ = client_limits(config([4]), -1)
    assert ca_unlimited.max_connections > 1_000_000
