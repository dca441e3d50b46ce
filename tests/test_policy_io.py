import json
import logging
import math

import pytest
import torch

from augsearch.ops.registry import get_op, list_ops
from augsearch.ops.tea import tea_pool
from augsearch.policy.core import ZERO_LOGIT, PolicyError
from augsearch.policy.init import make_policy
from augsearch.policy.io import (
    MIGRATIONS,
    SCHEMA_VERSION,
    PolicyFileError,
    load_policy,
    policy_from_dict,
    policy_to_dict,
    save_policy,
)
from augsearch.policy.presets import policy_from_file_or_preset

KITS = {"background": 0, "kidney": 1, "tumour": 2}


def _probs(policy, group, op):
    k = policy.op_names.index(op)
    return policy.tra_probs().detach().double()[policy.group_names.index(group), k, : policy.n_bins[k]]


def _write(tmp_path, doc, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


# -- make_policy: METHOD 3.3 / 3.4 initial values -------------------------------------------------------------------


@pytest.mark.parametrize(
    "init, expected",
    [
        ("nnunet", {"scale": 0.2, "rotate_xy": 0.1, "flip_x": 0.5, "flip_z": 0.5, "gamma": 0.3, "inverse_gamma": 0.1,
                    "intensity_shift": 0.05, "intensity_scale": 0.15, "contrast": 0.15, "blur_sharpen": 0.2,
                    "noise": 0.1, "low_resolution": 0.1}),
        ("deepmedic", {"scale": 0.2, "rotate_yz": 0.2, "flip_x": 0.5, "flip_y": 0.05, "flip_z": 0.05,
                       "intensity_shift": 0.15, "gamma": 0.05, "low_resolution": 0.05}),
    ],
)
def test_init_tables_match_method(init, expected):
    policy = make_policy(3, KITS, init=init)
    for group in ("background", "foreground"):
        for op, p_on in expected.items():
            probs = _probs(policy, group, op)
            n = len(probs) - 1
            torch.testing.assert_close(probs, torch.tensor([1 - p_on] + [p_on / n] * n, dtype=torch.float64),
                                       atol=1e-6, rtol=0)


def test_uniform_identity_and_rot90_availability():
    policy = make_policy(3, KITS, init="uniform-0.1", patch_size=[64, 64, 32])
    for op in policy.op_names:
        assert abs(float(1 - _probs(policy, "foreground", op)[0]) - 0.1) < 1e-6
    # rot90 is unavailable in the xz and yz planes (64 x 32): 0.1 split over the 6 angle bins only.
    torch.testing.assert_close(_probs(policy, "background", "rotate_xz"),
                               torch.tensor([0.9] + [0.1 / 6] * 6 + [0, 0], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(_probs(policy, "background", "rotate_xy"),
                               torch.tensor([0.9] + [0.0125] * 8, dtype=torch.float64), atol=1e-6, rtol=0)
    identity = make_policy(2, KITS, init="identity")
    assert torch.all(identity.tra_probs()[..., 0] == 1.0)
    bins = identity.sample_tra(torch.zeros(1000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.all(bins == 0)
    uniform = make_policy(2, KITS, init="uniform")
    torch.testing.assert_close(_probs(uniform, "background", "noise"), torch.full((4,), 0.25, dtype=torch.float64))


def test_tea_init_flips_follows_method():
    policy = make_policy(3, KITS, tea_init="flips")
    probs = policy.tea_probs().detach().double()
    names = policy.tea_names
    special = {"identity", "flip_x", "flip_y", "flip_z", "rot180_yz", "rot180_xz", "rot180_xy", "flip_all"}
    for i, name in enumerate(names):
        expected = 0.1 if name in special else 0.2 / 76
        assert abs(float(probs[i]) - expected) < 1e-6, name
    two = make_policy(2, KITS, tea_init="flips").tea_probs().detach().double()
    assert abs(float(two[0]) - 0.1) < 1e-6 and abs(float(two.sum()) - 1) < 1e-6 and len(two) == 65
    single = make_policy(3, KITS, tea_init="single-flips", tea_top_k=4)
    assert [names[i] for i, _ in single.tea_selected()] == ["identity", "flip_x", "flip_y", "flip_z"]
    assert all(abs(w - 0.25) < 1e-6 for _, w in single.tea_selected())
    ident = make_policy(3, KITS, tea_init="identity").tea_probs().detach().double()
    assert abs(float(ident[0]) - 0.99) < 1e-6


def test_groups_class_agnostic_and_user_groups():
    agnostic = make_policy(2, KITS, class_specific=False)
    assert agnostic.group_names == ("all",)
    assert agnostic.group_index(torch.tensor([0, 1, 2])).tolist() == [0, 0, 0]
    user = make_policy(2, KITS, groups={"background": ["background"], "kidney": ["kidney"], "tumour": ["tumour"]})
    assert user.tra_logits.shape[0] == 3
    assert user.group_index(torch.tensor([2, 1, 0])).tolist() == [2, 1, 0]
    with pytest.raises(PolicyError, match="tumour.*belong to no group"):
        make_policy(2, KITS, groups={"background": ["background"], "kidney": ["kidney"]})


def test_baseline_presets_describe_their_sampler():
    policy = make_policy(2, KITS, sampling="trivialaugment")
    n_ops = len(list_ops(2))
    for op in policy.op_names:
        assert abs(float(1 - _probs(policy, "foreground", op)[0]) - 1 / n_ops) < 1e-6


# -- round trip and validation -------------------------------------------------------------------------------------


def test_round_trip_preserves_logits_exactly(tmp_path):
    policy = make_policy(3, KITS, init="nnunet", patch_size=[48, 48, 24], tea_top_k=3)
    with torch.no_grad():
        policy.tra_logits.add_(torch.randn(policy.tra_logits.shape, generator=torch.Generator().manual_seed(0)))
        policy.tea_logits.add_(torch.randn(policy.tea_logits.shape, generator=torch.Generator().manual_seed(1)))
    path = tmp_path / "out" / "policy.json"
    save_policy(policy, path, provenance={"seed": 3, "run": "x"})
    loaded = load_policy(path)
    n = policy.available
    assert torch.equal(loaded.tra_logits[:, n], policy.tra_logits[:, n])
    assert torch.equal(loaded.tea_logits, policy.tea_logits)
    assert torch.equal(loaded.available, policy.available)
    assert loaded.group_labels == policy.group_labels and loaded.label_names == KITS
    assert loaded.tea_selected() == policy.tea_selected() and loaded.tea_top_k == 3
    doc = json.loads(path.read_text())
    assert doc["provenance"] == {"seed": 3, "run": "x"} and doc["schema_version"] == SCHEMA_VERSION
    assert doc["groups"][1] == {"name": "foreground", "labels": ["kidney", "tumour"], "values": [1, 2]}
    assert abs(sum(s["weight"] for s in doc["tea"]["selected"]) - 1) < 1e-9
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary left behind


def test_randaugment_settings_survive(tmp_path):
    policy = make_policy(2, KITS, sampling="randaugment", randaugment_n=3, randaugment_m=1)
    save_policy(policy, tmp_path / "ra.json")
    loaded = load_policy(tmp_path / "ra.json")
    assert (loaded.sampling, loaded.randaugment_n, loaded.randaugment_m) == ("randaugment", 3, 1)


@pytest.fixture
def doc():
    return policy_to_dict(make_policy(2, KITS, init="uniform-0.1"))


def test_unknown_op_lists_valid_ops(tmp_path, doc):
    doc["tra"]["ops"][0]["name"] = "elastic"
    with pytest.raises(PolicyFileError, match=r"unknown op 'elastic'; valid ops in 2D: scale, rotate_xy"):
        load_policy(_write(tmp_path, doc))


def test_probabilities_must_sum_to_one(tmp_path, doc):
    op = doc["tra"]["ops"][2]
    op["probs"]["foreground"][0] = 0.5
    with pytest.raises(PolicyFileError, match=r"tra.ops\[2\] \(flip_x\) group 'foreground': probabilities sum to 0.6"):
        load_policy(_write(tmp_path, doc))


def test_probs_and_logits_must_agree(doc):
    doc["tra"]["ops"][2]["logits"]["background"] = [0.0, 0.0]
    with pytest.raises(PolicyFileError, match=r"differ from softmax\(logits\)"):
        policy_from_dict(doc)


def test_lengths_must_match_bins(doc):
    doc["tra"]["ops"][3]["probs"]["background"] = [1.0]
    with pytest.raises(PolicyFileError, match=r"probs has 1 and logits 2 values, expected 2"):
        policy_from_dict(doc)


def test_bins_must_match_the_registry(doc):
    doc["tra"]["ops"][0]["bins"][1]["high"] = 0.2
    with pytest.raises(PolicyFileError, match="bins differ from this augsearch's registry"):
        policy_from_dict(doc)


def test_wrong_dims_and_ops_outside_dims(doc):
    bad = dict(doc, dims=4)
    with pytest.raises(PolicyFileError, match="dims must be 2 or 3, got 4"):
        policy_from_dict(bad)
    spec = get_op("flip_z").spec
    doc["tra"]["ops"][2] = dict(doc["tra"]["ops"][2], name="flip_z", bins=[
        {"label": b.label, "low": b.low, "high": b.high, "sign": b.sign} for b in spec.bins])
    with pytest.raises(PolicyFileError, match=r"op 'flip_z' is not available in 2D"):
        policy_from_dict(doc)


def test_newer_version_asks_for_an_upgrade(tmp_path, doc):
    doc["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(PolicyFileError, match=rf"reads \(version <= {SCHEMA_VERSION}\); upgrade"):
        load_policy(_write(tmp_path, doc))


def test_older_version_runs_the_migration_table(monkeypatch, doc):
    old = dict(doc, schema_version=0, tea={**doc["tea"], "aggregate": doc["tea"]["aggregation"]})
    del old["tea"]["aggregation"]
    with pytest.raises(PolicyFileError, match="schema_version 0 has no migration"):
        policy_from_dict(dict(old))

    def rename(data):
        tea = dict(data["tea"])
        tea["aggregation"] = tea.pop("aggregate")
        return {**data, "tea": tea}

    monkeypatch.setitem(MIGRATIONS, 0, rename)
    policy = policy_from_dict(old)
    assert policy.dims == 2


def test_missing_field_is_named(tmp_path, doc):
    del doc["tra"]["ops"][1]["kind"]
    with pytest.raises(PolicyFileError, match=r"missing field 'tra.ops\[1\].kind'"):
        load_policy(_write(tmp_path, doc))
    del doc["schema_version"]
    with pytest.raises(PolicyFileError, match="missing field 'schema_version'"):
        policy_from_dict(doc)


def test_unknown_field_is_rejected(doc):
    doc["tea"]["extra"] = 1
    with pytest.raises(PolicyFileError, match=r"unknown field 'tea.extra'"):
        policy_from_dict(doc)


def test_malformed_json_and_missing_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "format": "augsearch-policy",\n  "dims": 2,,\n}')
    with pytest.raises(PolicyFileError, match="malformed JSON at line 3, column 13"):
        load_policy(path)
    with pytest.raises(PolicyFileError, match="no policy file at"):
        load_policy(tmp_path / "absent.json")
    path.write_text('{"format": "something-else"}')
    with pytest.raises(PolicyFileError, match="not an augsearch policy file"):
        load_policy(path)


def test_tea_pool_and_selection_are_checked(doc):
    doc["tea"]["pool"][3]["name"] = "renamed"
    with pytest.raises(PolicyFileError, match="differs from this augsearch's 2D TEA pool"):
        policy_from_dict(doc)


def test_selected_must_follow_probs(doc):
    doc["tea"]["selected"] = [{"id": 5, "name": "x", "weight": 1.0}]
    with pytest.raises(PolicyFileError, match="selected is derived from probs"):
        policy_from_dict(doc)


# -- presets and binding -----------------------------------------------------------------------------------------


def test_preset_binds_to_dataset_labels_and_patch():
    policy = policy_from_file_or_preset("nnunet", 3, KITS, patch_size=[64, 64, 32], top_k=2)
    assert policy.group_labels == {"background": (0,), "foreground": (1, 2)}
    assert policy.tea_top_k == 2
    assert not bool(policy.available[policy.op_names.index("rotate_yz"), 7])
    same = policy_from_file_or_preset("nnunet-3d", 3, KITS, patch_size=[64, 64, 32], top_k=2)
    assert torch.equal(same.tra_logits, policy.tra_logits)
    with pytest.raises(PolicyFileError, match="is for 2D"):
        policy_from_file_or_preset("nnunet-2d", 3, KITS)
    with pytest.raises(PolicyFileError, match="neither a preset"):
        policy_from_file_or_preset("nnunett", 3, KITS)
    ra = policy_from_file_or_preset("randaugment", 2, KITS, randaugment_n=1, randaugment_m=3)
    assert (ra.sampling, ra.randaugment_n, ra.randaugment_m) == ("randaugment", 1, 3)


def test_file_binds_by_default_groups_or_by_name(tmp_path, caplog):
    save_policy(make_policy(2, {"background": 0, "foreground": 1}, init="nnunet"), tmp_path / "bf.json")
    with caplog.at_level(logging.WARNING, logger="augsearch.policy.presets"):
        bound = policy_from_file_or_preset(tmp_path / "bf.json", 2, KITS)
    assert bound.group_index(torch.tensor([0, 1, 2])).tolist() == [0, 1, 1]
    # Bound to other label names: said once, naming both label sets and the groups that decide.
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'bf.json'} was learned for labels ['background', 'foreground']; applying it to labels "
        "['background', 'kidney', 'tumour'] by its background/foreground groups"]
    caplog.clear()
    user = make_policy(2, KITS, groups={"bg": ["background"], "kid": ["kidney"], "tum": ["tumour"]})
    save_policy(user, tmp_path / "user.json")
    renumbered = {"background": 0, "tumour": 1, "kidney": 2}
    with caplog.at_level(logging.WARNING, logger="augsearch.policy.presets"):
        bound = policy_from_file_or_preset(tmp_path / "user.json", 2, renumbered)
    assert bound.group_index(torch.tensor([0, 1, 2])).tolist() == [0, 2, 1]
    assert caplog.records == []  # the same names, renumbered: nothing to say
    with pytest.raises(PolicyFileError, match="dataset's labels are"):
        policy_from_file_or_preset(tmp_path / "user.json", 2, {"background": 0, "liver": 1})
    with pytest.raises(PolicyFileError, match="class_specific is off"):
        policy_from_file_or_preset(tmp_path / "bf.json", 2, KITS, class_specific=False)


def test_zero_probability_bins_store_finite_logits(doc):
    identity = policy_to_dict(make_policy(2, KITS, init="identity"))
    logits = identity["tra"]["ops"][0]["logits"]["background"]
    assert logits[0] == 0.0 and all(v == ZERO_LOGIT for v in logits[1:])
    assert all(math.isfinite(v) for v in logits)
    assert len(identity["tea"]["pool"]) == len(tea_pool(2))
