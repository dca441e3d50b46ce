"""The smoke config as tests run it: `--set` arguments and a finished in-process search."""

from __future__ import annotations

from pathlib import Path

from augsearch.cli import main

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.toml"


def set_args(overrides: list[str]) -> list[str]:
    """`--set KEY=VALUE` command-line arguments, one pair per override."""
    return [arg for item in overrides for arg in ("--set", item)]


def smoke_search(tmp: Path, overrides: list[str]) -> Path:
    """A finished two-trial in-process search of the smoke config (seeds 0 and 1) in TMP/search."""
    assert main(["search", str(SMOKE), "--no-ray", "--out", str(tmp / "search"), *set_args(overrides)]) == 0
    return tmp / "search"
