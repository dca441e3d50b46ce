"""The HTML report of a search and of a training run: every section, inline PNG figures, the best trial marked,
baseline rows from a results.csv; bad folders and foreign files refused."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
from smoke import SMOKE, smoke_search

from augsearch.cli import main
from augsearch.service.report import ReportError, build_report

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "experiments" / "comparison" / "results.csv"
PNG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def tiny(data: Path) -> list[str]:
    return ["train.epochs=3", "train.iterations=2", f"data.root={json.dumps(str(data))}"]


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A finished three-epoch training run of the smoke config (learned TRA and TEA)."""
    from augsearch.config import load_config
    from augsearch.train import fit

    tmp = tmp_path_factory.mktemp("report-run")
    fit(load_config(SMOKE, tiny(tmp / "data")), tmp / "run", progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory):
    """A finished two-trial in-process search (seeds 0 and 1), three epochs each."""
    tmp = tmp_path_factory.mktemp("report-search")
    return smoke_search(tmp, tiny(tmp / "data"))


def images(page: str) -> dict[str, bytes]:
    found = {alt: base64.b64decode(data) for alt, data in PNG.findall(page)}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in found.values())
    return found


def section(page: str, name: str) -> str:
    match = re.search(rf'<section id="{name}">(.*?)</section>', page, re.S)
    assert match, f"no section {name}"
    return match.group(1)


@pytest.mark.slow
def test_search_report_has_every_section_and_figure(search_dir, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(search_dir), "--out", str(out), "--baselines", str(BASELINES)]) == 0
    page = out.read_text()
    summary = json.loads((search_dir / "summary.json").read_text())["trials"]
    best = max(summary, key=lambda row: row["metrics"]["val/dice_rare"])["trial"]
    other = next(row["trial"] for row in summary if row["trial"] != best)

    comparison = section(page, "comparison")
    assert f'<tr class="best"><td>{best}</td>' in comparison  # the best trial by val/dice_rare, marked
    assert f"<td>{other}</td>" in comparison and "<th>val/dice_rare</th>" in comparison
    assert "Baselines" in comparison and "<td>randaugment</td>" in comparison  # rows of the results.csv

    pictures = images(page)
    assert "validation curves per trial" in pictures
    tra = section(page, "tra")
    for trial in (best, other):  # a heatmap of the final policy and its trajectories, per trial
        assert f"TRA bin probabilities per class group, {trial}" in pictures
        assert f"P(op applied) over training per class group, {trial}" in pictures
        assert f"TEA weights, {trial}" in pictures
    assert f"<h3>{best} (best)</h3>" in tra and f"<summary>{other}</summary>" in tra  # others folded
    assert "background" in tra and "foreground" in tra  # the class groups are named
    assert 'src="http' not in page and "<script" not in page  # self-contained and static



def test_training_run_report(train_run, tmp_path):
    out = train_run / "report.html"
    assert main(["report", str(train_run)]) == 0  # default: RUN_DIR/report.html
    page = out.read_text()
    assert set(images(page)) == {
        "validation curves per trial", f"TRA bin probabilities per class group, {train_run.name}",
        f"P(op applied) over training per class group, {train_run.name}", f"TEA weights, {train_run.name}"}
    for name in ("comparison", "validation", "tra", "tea"):
        section(page, name)
    assert "training run, epoch 3 of 3" in page and "Baselines" not in page
    assert f'<tr class="best"><td>{train_run.name}</td><td>TERMINATED</td>' in page
    assert 'src="http' not in page and "<script" not in page  # self-contained and static

    # running it again replaces its own report, but never another file
    assert main(["report", str(train_run)]) == 0
    foreign = tmp_path / "notes.html"
    foreign.write_text("<p>mine</p>")
    assert main(["report", str(train_run), "--out", str(foreign)]) == 2
    assert foreign.read_text() == "<p>mine</p>"


@pytest.mark.slow
def test_a_search_stopped_part_way_still_reports(search_dir, tmp_path):
    copy = tmp_path / "stopped"
    shutil.copytree(search_dir, copy)
    (copy / "summary.json").unlink()
    page = build_report(copy)
    assert "not finished" in page and section(page, "comparison").count("<td>TERMINATED</td>") == 2


def test_protocol_results_are_shown_per_row_over_seeds(train_run, tmp_path):
    table = tmp_path / "protocol.csv"
    lines = ["size,row,seed,tta,class,metric,value"]
    for seed, dice in ((0, 0.80), (1, 0.90)):
        lines += [f"10,none,{seed},none,lesion,dice,{dice}", f"10,none,{seed},none,lesion,hd95,nan",
                  f"10,none,{seed},flips,lesion,dice,{dice - 0.1}", f"10,none,{seed},flips,lesion,hd95,{seed + 2}"]
    table.write_text("\n".join(lines) + "\n")
    comparison = section(build_report(train_run, baselines=table), "comparison")
    baselines = comparison[comparison.index("Baselines"):]
    assert "<th>seeds</th><th>lesion dice</th><th>lesion hd95</th>" in baselines
    # one row per (size, row, TTA): mean ± sample std over the two seeds; an undefined HD95 in every seed is "-"
    assert "<td>none</td><td>none</td><td class=\"num\">2</td><td>0.85 ± 0.071</td><td>-</td>" in baselines
    assert "<td>none</td><td>flips</td><td class=\"num\">2</td><td>0.75 ± 0.071</td><td>2.5 ± 0.71</td>" in baselines
    assert baselines.count("<tr>") == 3  # the header and two rows, not one per seed, class and metric


def test_bad_folders_and_tables_are_refused(train_run, tmp_path):
    with pytest.raises(ReportError, match="neither a search folder"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="does not exist"):
        build_report(train_run, baselines=tmp_path / "absent.csv")
    empty = tmp_path / "results.csv"
    empty.write_text("row,score\n")
    with pytest.raises(ReportError, match="no rows"):
        build_report(train_run, baselines=empty)
