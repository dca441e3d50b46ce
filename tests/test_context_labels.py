"""Context labels: targets of each kind, the merge back to the dataset's labels, CoLab's meta-gradient against brute
force, and train / search / export / predict / resume end to end on a tiny benchmark."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.func import functional_call

from augsearch.artifacts.checkpoint import CheckpointError, load_checkpoint
from augsearch.cli import main
from augsearch.config import ConfigError, LossConfig, load_config
from augsearch.context_labels import (
    ContextLabelError,
    ContextMerged,
    ContextSpec,
    context_spec,
    hard_target,
    merge_logits,
    merge_probabilities,
    split_target,
    task_labels,
)
from augsearch.errors import AugsearchError
from augsearch.learn.colab import generator_meta_gradient, generator_split
from augsearch.losses import batch_loss, per_sample_soft_loss
from augsearch.model import UNet
from augsearch.train import fit

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.toml"
LABELS = {"background": 0, "organ": 1, "lesion": 2}


# --- targets ----------------------------------------------------------------------------------------------------


def test_dilated_target_is_a_ring_of_the_set_width_around_the_foreground():
    labels = torch.zeros(1, 7, 7, dtype=torch.long)
    labels[0, 3, 3] = 2
    spec = ContextSpec("dilated", 3, 1, dilation=1)
    target = hard_target(spec, torch.zeros(1, 1, 7, 7), labels)
    expected = torch.zeros(7, 7, dtype=torch.long)
    expected[2:5, 2:5] = 3
    expected[3, 3] = 2
    assert torch.equal(target[0], expected)


def test_organ_target_moves_the_organ_to_the_context_class_and_keeps_the_lesion():
    labels = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    spec = context_spec(LossConfig(context_labels="organ", context_organ_label="organ", rare_labels=["lesion"]), LABELS)
    assert spec.organ_value == 1 and spec.total_classes == 4
    assert hard_target(spec, torch.zeros(1, 1, 2, 3), labels).tolist() == [[[0, 3, 3], [3, 2, 0]]]
    # Losses on the original labels see the organ as background: it is context, not a target.
    assert task_labels(spec, labels).tolist() == [[[0, 0, 0], [0, 2, 0]]]


def test_kmeans_target_sorts_background_clusters_by_intensity_per_sample():
    labels = torch.tensor([[[0, 0, 0, 0], [0, 0, 1, 2]], [[0, 0, 0, 0], [0, 0, 0, 1]]])
    image = torch.tensor([[[[0.1, 0.0, 5.0, 5.2], [0.2, 4.9, 9.0, 9.0]]],
                          [[[10.0, 10.1, -3.0, -2.9], [10.2, -3.1, 9.9, 0.0]]]])
    spec = ContextSpec("kmeans", 3, 2)
    target = hard_target(spec, image, labels)
    assert target.tolist() == [[[3, 3, 4, 4], [3, 4, 1, 2]], [[4, 4, 3, 3], [4, 3, 4, 1]]]


def test_colab_split_target_spreads_only_the_background():
    labels = torch.tensor([[[0, 1], [2, 0]]])
    split = torch.tensor([[[[0.25, 0.5], [0.5, 1.0]], [[0.75, 0.5], [0.5, 0.0]]]])
    target = split_target(ContextSpec("colab", 3, 2), labels, split)
    assert target.shape == (1, 5, 2, 2)
    assert torch.allclose(target.sum(1), torch.ones(1, 2, 2))
    assert target[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0, 0.25, 0.75]
    assert target[0, :, 0, 1].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert target[0, :, 1, 0].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]


def test_merge_adds_context_probabilities_to_the_background_and_keeps_k_labels():
    spec = ContextSpec("kmeans", 3, 2)
    logits = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    probs = torch.softmax(logits, 1)
    merged = merge_probabilities(probs, spec)
    assert merged.shape == (2, 3, 4, 4)
    assert torch.allclose(merged[:, 0], probs[:, 0] + probs[:, 3] + probs[:, 4])
    assert torch.allclose(merged[:, 1:], probs[:, 1:3])
    assert torch.allclose(torch.softmax(merge_logits(logits, spec), 1), merged)
    model = ContextMerged(UNet(2, 1, 5, base_features=2, depth=2), spec).eval()
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 3, 8, 8)
    with pytest.raises(ContextLabelError, match="K \\+ t = 5"):
        merge_logits(torch.randn(1, 4, 2, 2), spec)


# --- CoLab's meta-gradient against brute force ---------------------------------------------------------------------


def _meta_problem():
    torch.manual_seed(0)
    spec = ContextSpec("colab", 3, 2)
    segmenter = UNet(2, 1, 5, base_features=2, depth=2).double()
    generator = UNet(2, 1, 2, base_features=2, depth=2).double()
    x, vx = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    y, vy = torch.randint(0, 3, (2, 8, 8)), torch.randint(0, 3, (2, 8, 8))
    cfg, rare = LossConfig(), torch.tensor([False, False, True, False, False])

    def train_loss(out, target):
        return per_sample_soft_loss(out, target, None, cfg, rare).mean()

    def val_loss(out, labels):
        return batch_loss(merge_logits(out, spec), labels, "ce_dice", [1, 2])

    return spec, segmenter, generator, (x, y, vx, vy), train_loss, val_loss


@pytest.mark.parametrize("backend", ["jvp", "functional"])
def test_generator_meta_gradient_matches_finite_differences_of_the_post_step_validation_loss(backend):
    spec, segmenter, generator, (x, y, vx, vy), train_loss, val_loss = _meta_problem()
    lr = 0.5
    result = generator_meta_gradient(segmenter, generator, spec, x, y, vx, vy, inner_lr=lr, train_loss_fn=train_loss,
                                     val_loss_fn=val_loss, backend=backend)
    assert result.finite
    theta = {n: p.detach() for n, p in segmenter.named_parameters()}

    def post_step_val_loss(phi):  # brute force: the whole unrolled step, nothing shared with the backends
        leaves = {n: p.clone().requires_grad_() for n, p in theta.items()}
        target = split_target(spec, y, generator_split(generator, phi, x))
        grads = torch.autograd.grad(train_loss(functional_call(segmenter, leaves, (x,)), target), list(leaves.values()))
        stepped = {n: p - lr * g for (n, p), g in zip(leaves.items(), grads)}
        return float(val_loss(functional_call(segmenter, stepped, (vx,)), vy).detach())

    phi = {n: p.detach() for n, p in generator.named_parameters()}
    assert abs(result.val_loss - post_step_val_loss(phi)) < 1e-12
    generator_rng = torch.Generator().manual_seed(1)
    eps = 1e-5
    for _ in range(3):  # random directions through every generator parameter at once
        d = {n: torch.randn(p.shape, generator=generator_rng, dtype=p.dtype) for n, p in phi.items()}
        fd = (post_step_val_loss({n: p + eps * d[n] for n, p in phi.items()})
              - post_step_val_loss({n: p - eps * d[n] for n, p in phi.items()})) / (2 * eps)
        exact = sum(float((result.grads[n] * d[n]).sum()) for n in phi)
        assert exact == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # Nothing of the real networks changed.
    assert all(p.grad is None for p in [*segmenter.parameters(), *generator.parameters()])


def test_generator_meta_gradient_backends_agree_exactly():
    spec, segmenter, generator, (x, y, vx, vy), train_loss, val_loss = _meta_problem()
    results = [generator_meta_gradient(segmenter, generator, spec, x, y, vx, vy, inner_lr=0.1,
                                       train_loss_fn=train_loss, val_loss_fn=val_loss, backend=backend)
               for backend in ("jvp", "functional")]
    for name, grad in results[0].grads.items():
        assert torch.allclose(grad, results[1].grads[name], rtol=1e-9, atol=1e-13)
    assert any(float(g.abs().max()) > 0 for g in results[0].grads.values())


def test_generator_meta_gradient_reuses_a_given_inner_gradient():
    """The segmenter step's own gradient, passed in, gives the jvp backend's result without a second backward."""
    spec, segmenter, generator, (x, y, vx, vy), train_loss, val_loss = _meta_problem()
    with torch.no_grad():
        target = split_target(spec, y, generator_split(generator, dict(generator.named_parameters()), x))
    train_loss(segmenter(x), target).backward()
    inner = {n: p.grad.clone() for n, p in segmenter.named_parameters()}
    segmenter.zero_grad(set_to_none=True)
    kwargs = {"inner_lr": 0.1, "train_loss_fn": train_loss, "val_loss_fn": val_loss, "backend": "jvp"}
    fresh = generator_meta_gradient(segmenter, generator, spec, x, y, vx, vy, **kwargs)
    reused = generator_meta_gradient(segmenter, generator, spec, x, y, vx, vy, inner_grads=inner, **kwargs)
    assert reused.val_loss == pytest.approx(fresh.val_loss, rel=1e-12)
    for name, grad in fresh.grads.items():
        assert torch.allclose(reused.grads[name], grad, rtol=1e-9, atol=1e-13)


# --- configuration -----------------------------------------------------------------------------------------------


def tiny(data_root, **overrides):
    base = {"data.root": str(data_root), "train.epochs": 2, "train.iterations": 2, "train.batch_size": 4,
            "train.val_batch_size": 2, "augment.tea.views": 3}
    base.update(overrides)
    return load_config(SMOKE, [f"{k}={json.dumps(v)}" for k, v in base.items()])


@pytest.mark.parametrize("overrides, message", [
    ({"loss.context_labels": "organ"}, "needs loss.context_organ_label"),
    ({"loss.context_labels": "dilated", "loss.context_classes": 2}, "set loss.context_classes = 1"),
    ({"loss.context_labels": "kmeans", "loss.context_classes": 0}, "greater than or equal to 1"),
    ({"loss.context_labels": "kmeans", "loss.context_organ_label": "organ"}, "read by loss.context_labels = 'organ'"),
    ({"loss.context_labels": "colab", "loss.mixup_alpha": 0.2}, "does not combine"),
    ({"loss.context_labels": "tree"}, "context_labels"),
])
def test_bad_context_settings_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(tmp_path, **overrides)


@pytest.mark.parametrize("organ, rare, message", [
    ("liver", ["lesion"], "not a foreground label of this dataset"),
    ("background", ["lesion"], "not a foreground label"),
    ("lesion", ["lesion"], "also in loss.rare_labels"),
    ("organ", None, "needs loss.rare_labels"),
])
def test_organ_label_must_be_a_non_rare_foreground_label(organ, rare, message):
    cfg = LossConfig(context_labels="organ", context_organ_label=organ, rare_labels=rare)
    with pytest.raises(ContextLabelError, match=message):
        context_spec(cfg, LABELS)


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colab_run(data_root, tmp_path_factory):
    """A joint TRA + TEA search with CoLab context labels (t = 2)."""
    run_dir = tmp_path_factory.mktemp("colab") / "run"
    cfg = tiny(data_root, **{"loss.context_labels": "colab"})
    return fit(cfg, run_dir, progress=False), cfg


def test_colab_joint_run_exports_a_k_plus_t_head_that_predicts_the_dataset_labels(colab_run, tmp_path):
    result, cfg = colab_run
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["meta/steps"] == 4 and metrics[-1]["nonfinite/colab"] == 0
    assert np.isfinite(metrics[-1]["colab/val_loss"])
    ckpt = load_checkpoint(result.checkpoint_path)
    assert ckpt.model_config["num_classes"] == 5 and ckpt.num_classes == 3
    assert ckpt.context_spec() == ContextSpec("colab", 3, 2)
    assert ckpt.build_model()(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    assert "colab" in ckpt.joint_state  # the generator resumes with the run; prediction never reads it

    assert main(["export", str(result.run_dir), "--out", str(tmp_path / "export")]) == 0
    pred = tmp_path / "pred"
    assert main(["predict", "--model", str(tmp_path / "export" / "checkpoint.pt"), "--policy",
                 str(tmp_path / "export" / "policy.json"), "--input", str(Path(cfg.data.root) / "imagesTs"),
                 "--output", str(pred)]) == 0
    files = sorted(pred.glob("*.nii.gz"))
    assert files
    for file in files:
        assert set(np.unique(np.asarray(nib.load(file).dataobj)).tolist()) <= set(LABELS.values())


def test_colab_run_resumes_with_its_generator(colab_run, data_root, tmp_path):
    result, _ = colab_run
    ckpt = load_checkpoint(result.checkpoint_path)
    cfg = tiny(data_root, **{"loss.context_labels": "colab", "train.epochs": 3})
    resumed = fit(cfg, tmp_path / "resumed", progress=False, resume=result.checkpoint_path, resume_anyway=True)
    saved = ckpt.joint_state["colab"]["network"]
    after = load_checkpoint(resumed.checkpoint_path).joint_state["colab"]["network"]
    assert set(saved) == set(after)
    # One more epoch of generator steps from the saved generator: moved, but not re-initialised.
    moved = [float((after[k] - saved[k]).abs().max()) for k in saved]
    assert 0 < max(moved) < 0.1


@pytest.mark.parametrize("kind, mode", [
    ("kmeans", {"augment.mode": "none", "augment.tra.learn": False, "augment.tea.learn": False}),
    ("dilated", {"augment.tra.learn": False, "augment.tea.learn": False}),
    ("organ", {"augment.tea.learn": False}),
    ("colab", {"augment.tra.learn": False, "augment.tea.learn": False}),
])
def test_each_kind_trains_in_each_augment_mode(data_root, tmp_path, kind, mode):
    extra = {"loss.context_organ_label": "organ"} if kind == "organ" else {}
    cfg = tiny(data_root, **{"loss.context_labels": kind, "train.epochs": 1, **extra, **mode})
    result = fit(cfg, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(result.checkpoint_path)
    t = 2 if kind in ("kmeans", "colab") else 1
    assert ckpt.model_config["num_classes"] == 3 + t and ckpt.context["kind"] == kind
    assert 0 <= result.metrics["val/dice_rare"] <= 1
    if kind == "colab":  # the generator steps without a learned TRA too
        assert result.metrics["meta/steps"] == 0 and np.isfinite(result.metrics["colab/val_loss"])


def test_tea_only_on_a_frozen_context_model(colab_run, data_root, tmp_path):
    result, _ = colab_run
    frozen_cfg = {"train.epochs": 1, "augment.tra.learn": False, "train.update_model": False,
                  "train.init_checkpoint": str(result.checkpoint_path)}
    with pytest.raises(AugsearchError, match="set loss.context_labels and loss.context_classes as the checkpoint's"):
        fit(tiny(data_root, **frozen_cfg), tmp_path / "plain", progress=False)
    # A frozen CoLab model learns no generator: TEA alone, on the merged outputs.
    frozen = fit(tiny(data_root, **frozen_cfg, **{"loss.context_labels": "colab"}), tmp_path / "tea", progress=False)
    ckpt = load_checkpoint(frozen.checkpoint_path)
    assert ckpt.metrics["tea/loss"] >= 0 and "colab" not in ckpt.joint_state
    saved = load_checkpoint(result.checkpoint_path).model_state
    assert all(torch.equal(ckpt.model_state[k], saved[k]) for k in saved)  # the segmenter stayed frozen


def test_search_without_ray_trains_context_labels(data_root, tmp_path):
    sets = [a for k, v in {"data.root": str(data_root), "train.epochs": 1, "train.iterations": 2,
                           "train.batch_size": 4, "train.val_batch_size": 2, "augment.tea.views": 3,
                           "loss.context_labels": "colab"}.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["search", str(SMOKE), "--no-ray", "--out", str(tmp_path / "search"), *sets]) == 0
    assert main(["export", str(tmp_path / "search"), "--out", str(tmp_path / "export")]) == 0
    assert load_checkpoint(tmp_path / "export" / "checkpoint.pt").context["kind"] == "colab"


def test_damaged_context_settings_in_a_checkpoint_are_refused(colab_run, tmp_path):
    result, _ = colab_run
    payload = torch.load(result.checkpoint_path, weights_only=True)
    payload["context"]["context_classes"] = 3
    torch.save(payload, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="K \\+ t = 6"):
        load_checkpoint(tmp_path / "checkpoint.pt").build_model()
    payload["context"] = "colab"
    torch.save(payload, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(tmp_path / "checkpoint.pt").num_classes  # noqa: B018 - the property is what is tested
