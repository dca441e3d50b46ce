"""Every file under policies/ validates; schema.json and the preset files match the code; the policy CLI."""

import json
from pathlib import Path

import pytest
import torch

from augsearch.cli import main
from augsearch.policy.init import make_policy
from augsearch.policy.io import load_policy, policy_json_schema, save_policy
from augsearch.policy.presets import PRESETS, policy_from_file_or_preset, preset_document, preset_file_name

POLICIES = Path(__file__).resolve().parents[1] / "augsearch" / "policies"


def test_every_policy_file_validates():
    files = sorted(p for p in POLICIES.rglob("*.json") if p.name != "schema.json")
    assert len(files) >= 2 * len(PRESETS)
    for path in files:
        policy = load_policy(path)
        assert policy.dims in (2, 3), path


def test_schema_json_matches_the_code():
    on_disk = json.loads((POLICIES / "schema.json").read_text())
    assert on_disk == policy_json_schema(), "regenerate: augsearch policy schema > augsearch/policies/schema.json"


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("dims", [2, 3])
def test_preset_files_match_the_code(name, dims):
    on_disk = json.loads((POLICIES / "presets" / preset_file_name(name, dims)).read_text())
    assert on_disk == preset_document(name, dims), (
        "regenerate: augsearch policy presets --write augsearch/policies/presets"
    )


def test_flips_tta_preset_selects_identity_and_single_flips():
    policy = load_policy(POLICIES / "presets" / "flips-tta-3d.json")
    assert [policy.tea_names[i] for i, _ in policy.tea_selected()] == ["identity", "flip_x", "flip_y", "flip_z"]
    assert torch.all(policy.tra_probs()[..., 0] == 1.0)
    nnunet = load_policy(POLICIES / "presets" / "nnunet-2d.json")
    assert nnunet.tea_selected() == [(0, 1.0)]


@pytest.mark.parametrize("baseline", ["randaugment", "trivialaugment"])
def test_marginals_presets_start_an_independent_policy_at_the_baselines_per_op_marginals(baseline):
    """Each op is applied as often and at the same bins as under the baseline sampler, but drawn independently."""
    fixed = make_policy(2, ["background", "lesion"], sampling=baseline, randaugment_n=1, randaugment_m=3)
    start = policy_from_file_or_preset(f"{baseline}-marginals", 2, ["background", "lesion"], randaugment_n=1,
                                       randaugment_m=3)
    assert start.sampling == "independent"
    marginals = fixed.baseline_marginals()
    for group in range(start.tra_probs().shape[0]):
        torch.testing.assert_close(start.tra_probs()[group].double()[start.available],
                                   marginals[start.available], atol=1e-6, rtol=0)
    bins = start.sample_tra(torch.zeros(20000, dtype=torch.long), torch.Generator().manual_seed(0))
    applied = (bins != 0).sum(1)
    assert len(set(applied.tolist())) > 2  # independent draws: the number of ops applied varies
    assert abs(float(applied.double().mean()) - 1.0) < 0.05  # on average the baseline's one op


def test_cli_validate(tmp_path, capsys):
    good = POLICIES / "presets" / "nnunet-2d.json"
    bad = tmp_path / "bad.json"
    doc = json.loads(good.read_text())
    doc["tra"]["ops"][0]["name"] = "warp"
    bad.write_text(json.dumps(doc))
    assert main(["policy", "validate", str(good)]) == 0
    assert f"OK {good}" in capsys.readouterr().out
    assert main(["policy", "validate", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"OK {good}" in out and f"INVALID {bad}" in out and "unknown op 'warp'" in out


def test_cli_show_and_png(tmp_path, capsys):
    policy = make_policy(2, {"background": 0, "lesion": 1}, init="nnunet", tea_top_k=2)
    save_policy(policy, tmp_path / "p.json")
    png = tmp_path / "heat.png"
    assert main(["policy", "show", str(tmp_path / "p.json"), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "group foreground (labels: lesion)" in out
    assert "flip_x           0.500  on 0.500" in out
    assert "TEA top-2" in out and "identity" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_schema_prints_the_schema(capsys):
    assert main(["policy", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == policy_json_schema()


def test_cli_diff(tmp_path, capsys):
    a = make_policy(2, {"background": 0, "lesion": 1}, init="uniform-0.1")
    b = make_policy(2, {"background": 0, "lesion": 1}, init="uniform-0.1")
    with torch.no_grad():
        k = b.op_names.index("flip_x")
        b.tra_logits[1, k, 1] = b.tra_logits[1, k, 0]  # foreground flip_x: 0.1 -> 0.5
        b.tea_logits[18] = 5.0  # flip_y first
    save_policy(a, tmp_path / "a.json")
    save_policy(b, tmp_path / "b.json")
    assert main(["policy", "diff", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert "no probability differs" in capsys.readouterr().out
    assert main(["policy", "diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    out = capsys.readouterr().out
    assert "foreground/flip_x: P(on) 0.100 -> 0.500" in out
    assert "background/flip_x" not in out
    assert "TEA top-K: A ['identity', 'flip_x', 'flip_y', 'rot180_xy'] -> B ['flip_y'" in out


def test_cli_reports_a_missing_file(tmp_path, capsys):
    assert main(["policy", "show", str(tmp_path / "none.json")]) == 2
    assert "no policy file at" in capsys.readouterr().err
