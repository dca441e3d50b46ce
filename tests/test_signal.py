"""`augsearch bench signal`: the statistics tell a signal from noise, and the benchmark runs end to end (smoke)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from augsearch.bench.signal import signal_statistics
from augsearch.cli import main

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.toml"


def test_statistics_separate_a_direction_from_noise():
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(32, 150, generator=generator)
    stats = signal_statistics(noise, noise_seed=1)
    low, high = stats["noise_snr_band"]
    assert low <= stats["noise_snr"] <= high and abs(stats["noise_halves_cosine"]) < 0.4
    direction = torch.randn(150, generator=generator)
    signal = signal_statistics(noise + 2 * direction, noise_seed=1)
    assert signal["snr"] > 3 * high and signal["halves_cosine"] > 0.9
    constant = torch.cat([noise, torch.zeros(32, 5)], dim=1)  # coordinates no draw moves are left out
    assert signal_statistics(constant)["constant_coordinates"] == 5


def test_bench_signal_runs_on_the_smoke_config(tmp_path, capsys):
    data = tmp_path / "data"
    out = tmp_path / "signal.json"
    args = ["bench", "signal", "--device", "cpu", "--config", str(SMOKE), "--points", "8", "--draws", "4",
            "--workers", "1", "2", "--options", "base", "accumulate", "precondition", "rare_outer", "reinforce",
            "--accumulate", "2",
            "--set", "train.iterations=4", "--set", "train.num_threads=1",
            "--set", f"data.root={json.dumps(str(data))}",
            "--json", str(out)]
    assert main(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["option"], r["workers"]) for r in rows} == {
        ("base", 1), ("base", 2), ("accumulate", 1), ("precondition", 1), ("precondition", 2), ("rare_outer", 1),
        ("reinforce", 1), ("reinforce", 2)}
    assert all(r["steps"] == 8 and r["draws"] == 4 and r["coordinates"] > 0 for r in rows)
    # Progress goes to stderr, one line per search epoch and per row, so stdout stays the JSON alone.
    captured = capsys.readouterr()
    assert json.loads(captured.out)["results"] == rows
    assert "[bench signal] search: 8/8 segmenter steps" in captured.err
    assert "[bench signal] S=8 reinforce N=2: snr" in captured.err
