"""Every benchmark runs in its CI-sized form and writes the JSON it prints (figures are not asserted: they are
measured on whichever machine runs them)."""

import json
import math

import pytest

from augsearch.cli import main


def _ratios(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if "ratio" in key and isinstance(value, (int, float)):
                yield key, value
            yield from _ratios(value)
    elif isinstance(node, list):
        for item in node:
            yield from _ratios(item)


@pytest.mark.parametrize("name, extra", [
    ("train", ["--repeats", "1"]),
    ("augment", ["--repeats", "1"]),
    ("meta", ["--repeats", "1", "--dims", "2", "--backends", "jvp", "fd"]),
    ("tta", ["--repeats", "1"]),
])
def test_benchmark_quick_form_writes_json(tmp_path, capsys, name, extra):
    out = tmp_path / f"{name}.json"
    assert main(["bench", name, "--quick", "--device", "cpu", "--json", str(out), *extra]) == 0
    results = json.loads(out.read_text())
    assert results == json.loads(capsys.readouterr().out)
    assert results["environment"]["device"] == "cpu"
    ratios = dict(_ratios(results))
    if name in ("augment", "meta", "tta"):
        assert ratios, f"bench {name} reports no ratio"
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
