"""The CLI contract: subcommands exist and PODFENCE_* environment variables set flags."""

from __future__ import annotations

from agent.cli import SUBCOMMANDS, build_parser, env_name


def test_every_subcommand_is_registered() -> None:
    _, runners = build_parser()
    assert set(runners) == set(SUBCOMMANDS) >= {"control", "agent", "status", "explain", "lab", "demo"}


def test_env_var_name() -> None:
    assert env_name("--unknown-endpoints") == "PODFENCE_UNKNOWN_ENDPOINTS"


def test_log_format_from_env(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PODFENCE_LOG_FORMAT", "json")
    parser, _ = build_parser()
    args = parser.parse_args(["status", "--control", "x"])
    assert args.log_format == "json"
