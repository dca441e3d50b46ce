"""`augsearch plan`: planning rules, configs that load and run as written, the op set and TEA start keys."""

import importlib.util
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.cli import main
from augsearch.config import load_config
from augsearch.data.plan import fingerprint, make_plan, plan_toml, pooling, rare_labels, target_spacing
from augsearch.data.synthetic import write_benchmark
from augsearch.errors import PolicyError, PolicyFileError
from augsearch.ops.registry import list_ops
from augsearch.ops.tea import tea_pool
from augsearch.policy.init import make_policy, tea_init_probs
from augsearch.policy.io import save_policy
from augsearch.policy.presets import policy_from_file_or_preset
from augsearch.train import fit

REPO = Path(__file__).resolve().parents[1]
LABELS = {"background": 0, "organ": 1, "lesion": 2}


def _hippocampus() -> Path | None:
    """../shared/data/msd_hippocampus_200 beside this checkout or beside the main checkout of a linked worktree."""
    roots = [REPO]
    if (REPO / ".git").is_file():  # a linked worktree: .git names <main>/.git/worktrees/<name>
        roots.append(Path((REPO / ".git").read_text().split(":", 1)[1].strip()).parents[2])
    for root in roots:
        path = root.parent / "shared" / "data" / "msd_hippocampus_200"
        if (path / "dataset.json").is_file():
            return path
    return None


def _plan_file(dataset: Path, out: Path, *extra: str) -> Path:
    assert main(["plan", str(dataset), "--device", "cpu", "--out", str(out), *extra]) == 0
    return out


def _fit_twice(config: Path, run_dir: Path):
    """Run the planned config as written, but for one epoch of 2 iterations on one thread."""
    cfg = load_config(config, {"train.epochs": 1, "train.iterations": 2, "train.num_threads": 1})
    return fit(cfg, run_dir, progress=False)


@pytest.fixture(scope="module")
def bench3d(tmp_path_factory) -> Path:
    return write_benchmark(tmp_path_factory.mktemp("b3") / "data", dims=3, cases=5, train_cases=3, size=24)


@pytest.fixture(scope="module")
def anisotropic(tmp_path_factory, bench3d) -> Path:
    """The 3D benchmark with every third slice kept and 4.5 mm slices: strongly anisotropic, thin in z."""
    out = tmp_path_factory.mktemp("aniso") / "data"
    shutil.copytree(bench3d, out, ignore=shutil.ignore_patterns("imagesTs", ".augsearch_cache"))
    for path in sorted(out.glob("*Tr/*.nii.gz")):
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)[:, :, ::3]
        affine = img.affine.copy()
        affine[2, 2] = 4.5
        new = nib.Nifti1Image(data, affine)
        new.set_qform(affine, code=1)
        new.set_sform(affine, code=1)
        nib.save(new, str(path))
    return out


def test_target_spacing_takes_the_10th_percentile_of_a_coarse_axis():
    iso = np.array([[1.0, 1.0, 1.5], [1.0, 1.0, 1.5], [0.9, 0.9, 1.4]])
    assert target_spacing(iso)[0] == [1.0, 1.0, 1.5]
    thick = np.array([[0.8, 0.8, z] for z in (2.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0)])
    spacing, why = target_spacing(thick)
    assert spacing[:2] == [0.8, 0.8] and spacing[2] == pytest.approx(np.percentile(thick[:, 2], 10))
    assert spacing[2] < 5.0 and "10th percentile" in why


def test_pooling_waits_for_a_coarse_axis_and_stops_at_four_voxels():
    assert pooling([32, 32, 32], [1.0, 1.0, 1.0]) == [[2, 2, 2]] * 3
    assert pooling([64, 64, 16], [1.0, 1.0, 4.0]) == [[2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert pooling([8, 6], [1.0, 1.0]) == [[2, 1]]


def test_rare_labels_are_the_small_foreground_classes():
    labels = {"background": 0, "liver": 1, "tumour": 2}
    assert rare_labels({"background": 0.9, "liver": 0.09, "tumour": 0.01}, labels)[0] == ["tumour"]
    alike = {"background": 0.9, "liver": 0.049, "tumour": 0.051}
    assert rare_labels(alike, labels)[0] == ["liver"]


def test_planned_3d_benchmark_config_loads_and_runs(tmp_path, bench3d):
    config = _plan_file(bench3d, tmp_path / "plan.toml")
    text = config.read_text()
    assert text.count("\n#") > 10  # every planned value carries its reason
    cfg = load_config(config)
    assert main(["config", "show", str(config)]) == 0
    assert cfg.train.patch_size == [24, 24, 24] and cfg.model.depth == 3
    assert cfg.train.batch_size >= 4 and cfg.train.fg_fraction == 0.5
    assert cfg.loss.rare_labels == ["lesion"] and cfg.augment.tra.learn and cfg.augment.tea.learn
    assert cfg.data.preprocess.target_spacing == [1.0, 1.0, 1.5] and cfg.data.preprocess.normalization == "zscore"
    # The xz and yz planes have 1 x 1.5 mm voxels: a quarter turn there would stretch the anatomy.
    assert set(cfg.augment.tea.exclude) == {"rot90_yz+", "rot90_yz-", "rot90_xz+", "rot90_xz-"}
    # The search's start keeps a train/validation shift visible: no flips at 0.5, no TEA views in TRA's outer loss.
    assert cfg.augment.policy == "uniform-0.1" and not cfg.augment.tea.augment_outer_batch
    assert (cfg.train.optimizer, cfg.train.lr) == ("adam", 3e-3)  # the CPU budget is too short for SGD
    result = _fit_twice(config, tmp_path / "run")
    assert np.isfinite(result.metrics["train/loss"])
    policy = json.loads(result.policy_path.read_text())
    tea_available = dict(zip([e["name"] for e in policy["tea"]["pool"]], policy["tea"]["available"]))
    assert not tea_available["rot90_xz+"] and tea_available["rot90_xy+"]


def test_anisotropic_spacing_gives_an_anisotropic_patch_without_out_of_plane_rotations(tmp_path, anisotropic):
    config = _plan_file(anisotropic, tmp_path / "plan.toml")
    cfg = load_config(config)
    assert cfg.data.preprocess.target_spacing == [1.0, 1.0, 4.5]
    x, y, z = cfg.train.patch_size
    assert x == y == 24 and z < x  # 8 slices on disk: the patch follows the data
    assert cfg.model.pool_kernels[0] == [2, 2, 1]  # thick slices: z is pooled only once x and y have caught up
    assert "rotate_xz" not in cfg.augment.ops and "rotate_yz" not in cfg.augment.ops
    assert "rotate_xy" in cfg.augment.ops
    result = _fit_twice(config, tmp_path / "run")
    assert np.isfinite(result.metrics["train/loss"])
    checkpoint = load_checkpoint(result.checkpoint_path)
    assert checkpoint.model_config["pool_kernels"] == cfg.model.pool_kernels


def test_planned_hippocampus_config_runs(tmp_path):
    source = _hippocampus()
    if source is None:
        pytest.skip("../shared/data/msd_hippocampus_200 is not beside this checkout (the shared MSD Hippocampus copy)")
    data = tmp_path / "hippocampus"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    shutil.copyfile(source / "dataset.json", data / "dataset.json")
    for label in sorted((source / "labelsTr").glob("*.nii.gz"))[:3]:
        case = label.name.removesuffix(".nii.gz")
        shutil.copyfile(label, data / "labelsTr" / label.name)
        shutil.copyfile(source / "imagesTr" / f"{case}_0000.nii.gz", data / "imagesTr" / f"{case}_0000.nii.gz")
    config = _plan_file(data, tmp_path / "plan.toml")
    cfg = load_config(config)
    assert cfg.data.preprocess.normalization == "zscore"  # channel "MRI"
    assert cfg.loss.rare_labels and set(cfg.loss.rare_labels) <= {"Anterior", "Posterior"}
    result = _fit_twice(config, tmp_path / "run")
    assert np.isfinite(result.metrics["train/loss"])
    gpu = make_plan(fingerprint(data), device="cuda", memory_gb=8)  # median shape ~ 36 x 50 x 35 at 1 mm
    assert gpu.patch_size == [32, 48, 32]
    assert {"rot90_xy+", "rot90_yz-"} <= set(gpu.tea_exclude) and "rot90_xz+" not in gpu.tea_exclude


def test_planned_2d_benchmark_config_runs(tmp_path):
    data = write_benchmark(tmp_path / "data", dims=2, cases=5, train_cases=3, size=48)
    cfg = load_config(_plan_file(data, tmp_path / "plan.toml"))
    assert cfg.train.patch_size == [48, 48] and cfg.train.batch_size == 16 and cfg.augment.tea.exclude == []
    assert cfg.augment.ops == list_ops(2)
    assert np.isfinite(_fit_twice(tmp_path / "plan.toml", tmp_path / "run").metrics["train/loss"])


def test_the_optimiser_follows_the_device(bench3d):
    fp = fingerprint(bench3d)
    gpu, cpu = make_plan(fp, "cuda"), make_plan(fp, "cpu")
    assert (gpu.optimizer, gpu.lr) == ("sgd", 1e-2)  # nnU-Net's, for the long GPU budget
    assert (cpu.optimizer, cpu.lr) == ("adam", 3e-3)
    assert "short" in cpu.why["optimizer"] and "nnU-Net" in gpu.why["optimizer"]


@pytest.mark.slow
def test_a_cpu_planned_config_learns_the_3d_lesion(tmp_path):
    """Plain training as planned for a CPU, 300 iterations: the lesion (about 15 voxels of 24^3) is found on the
    validation cases. With nnU-Net's SGD 1e-2 the same U-Net predicted no lesion voxel at all after 400 iterations."""
    data = write_benchmark(tmp_path / "data", dims=3, cases=12, train_cases=8, size=24)
    config = _plan_file(data, tmp_path / "plan.toml", "--mode", "none")
    cfg = load_config(config, {"train.epochs": 6, "train.iterations": 50, "train.validate_every": 6,
                               "train.num_threads": 1})
    result = fit(cfg, tmp_path / "run", progress=False)
    assert result.metrics["val/dice_lesion"] > 0.2, f"validation lesion Dice {result.metrics['val/dice_lesion']:.3f}"


def test_plan_refuses_to_overwrite(tmp_path, bench3d, capsys):
    out = tmp_path / "plan.toml"
    out.write_text("# mine\n")
    assert main(["plan", str(bench3d), "--device", "cpu", "--out", str(out)]) == 2
    assert out.read_text() == "# mine\n" and "--overwrite" in capsys.readouterr().err
    _plan_file(bench3d, out, "--overwrite")
    assert load_config(out).train.patch_size == [24, 24, 24]


def test_smaller_memory_gives_a_smaller_patch_and_modes_set_what_is_learned(bench3d):
    fp = fingerprint(bench3d)
    big, small = make_plan(fp, "cuda", 8.0), make_plan(fp, "cuda", 0.005)
    assert np.prod(small.patch_size) < np.prod(big.patch_size) and small.memory_estimate_gb <= 0.75 * 0.005
    for mode, tra, tea in (("none", False, False), ("tra", True, False), ("tea", False, True)):
        text = plan_toml(make_plan(fp, "cpu", mode=mode), str(bench3d))
        cfg = load_config_text(text)
        assert (cfg.augment.tra.learn, cfg.augment.tea.learn) == (tra, tea)


def load_config_text(text: str):
    import tomllib

    from augsearch.config import config_from_dict

    return config_from_dict(tomllib.loads(text))


# augment.ops, augment.tea.exclude, augment.tea.init


def test_ops_limit_tra_and_the_tea_pool_and_exclude_removes_entries():
    ops = [op for op in list_ops(3) if op not in ("rotate_xz", "rotate_yz")]
    policy = make_policy(3, LABELS, ops=ops, tea_exclude=["rot90_xy+"])
    assert list(policy.op_names) == ops
    available = dict(zip(policy.tea_names, policy.tea_available.tolist()))
    assert not available["rot90_xz+"] and not available["rotate_yz+5"] and not available["rot90_xy+"]
    assert available["rot90_xy-"] and available["identity"] and available["flip_all"] and available["gamma_up_0.1"]
    assert float(policy.tea_probs().detach()[~policy.tea_available].sum()) == 0.0
    no_z_flip = make_policy(3, LABELS, ops=[op for op in list_ops(3) if op != "flip_z"])
    assert not dict(zip(no_z_flip.tea_names, no_z_flip.tea_available.tolist()))["flip_all"]
    with pytest.raises(PolicyError, match="rot90_ab"):
        make_policy(3, LABELS, tea_exclude=["rot90_ab"])
    with pytest.raises(PolicyError, match="identity"):
        make_policy(3, LABELS, tea_exclude=["identity"])


@pytest.mark.parametrize("init", ["flips", "single-flips", "identity", "uniform"])
def test_tea_init_sets_the_tea_start_of_presets_and_files(tmp_path, init):
    expected = torch.tensor(tea_init_probs(tea_pool(3), 3, init))
    preset = policy_from_file_or_preset("nnunet", 3, LABELS, tea_init=init)
    assert torch.allclose(preset.tea_probs(), expected, atol=1e-6)
    path = tmp_path / "p.json"
    save_policy(make_policy(3, LABELS, tea_init="identity"), path)
    from_file = policy_from_file_or_preset(path, 3, LABELS, tea_init=init)
    assert torch.allclose(from_file.tea_probs(), expected, atol=1e-6)
    kept = policy_from_file_or_preset(path, 3, LABELS)  # no tea_init: the file's own start
    assert float(kept.tea_probs().detach()[0]) == pytest.approx(0.99, abs=1e-5)


def test_tea_init_reaches_the_run(tmp_path, bench3d):
    cfg = load_config(_plan_file(bench3d, tmp_path / "plan.toml"), {
        "augment.tea.init": "uniform", "augment.tea.learn": False, "augment.tra.learn": False,
        "train.epochs": 1, "train.iterations": 1, "train.num_threads": 1})
    result = fit(cfg, tmp_path / "run", progress=False)
    tea = json.loads(result.policy_path.read_text())["tea"]
    probs = [p for p, ok in zip(tea["probs"], tea["available"]) if ok]
    assert max(probs) == pytest.approx(min(probs))


def test_a_policy_file_with_other_ops_is_refused(tmp_path):
    path = tmp_path / "p.json"
    save_policy(make_policy(3, LABELS), path)
    with pytest.raises(PolicyFileError, match="augment.ops"):
        policy_from_file_or_preset(path, 3, LABELS, ops=["flip_x"])


# The CI-sized version of experiments/plan3d/run.py (the full run and its numbers: experiments/plan3d/README.md).

RUN_PY = REPO / "experiments" / "plan3d" / "run.py"


@pytest.mark.slow
def test_plan3d_experiment_runs_at_ci_size(tmp_path):
    """The full run's first 50 iterations (the same data, seed and learning rates: poly decay starts at epoch 0), for
    the shifted benchmark and the control: the direction the full run shows is already there."""
    spec = importlib.util.spec_from_file_location("plan3d_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = {name: module.run_one(name, tmp_path, size=24, cases=28, train_cases=18, epochs=1, iterations=50,
                                 validate_every=1, seed=0, threads=1) for name in ("flip_x", "control")}
    shifted, control = rows["flip_x"], rows["control"]
    assert shifted["planned"]["patch_size"] == [24, 24, 24] and shifted["planned"]["rare_labels"] == ["lesion"]
    assert set(shifted["p_flip_x"]) == {"background", "foreground"}
    # Mirrored validation cases: TEA moves towards the x-mirroring entries and TRA towards flip_x in both groups,
    # more than without the shift (full run, iteration 50: fg 0.16 against 0.04, bg 0.31 against 0.07, TEA 0.46).
    assert shifted["tea_x_mirror_mass"] > control["tea_x_mirror_mass"] + 0.1
    for group in ("foreground", "background"):
        assert shifted["p_flip_x"][group] > control["p_flip_x"][group] + 0.05
