"""predict_tta: identity = plain prediction, exact flips against a hand-built ensemble, affine round trips, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from augsearch.model import UNet
from augsearch.policy.core import ZERO_LOGIT
from augsearch.policy.init import make_policy
from augsearch.predict.sliding_window import sliding_window_predict
from augsearch.predict.tta import TTAError, TTAResult, predict_tta, view_padding

LABELS = {"background": 0, "organ": 1, "lesion": 2}
SHAPES = {2: (37, 29), 3: (19, 23, 17)}  # odd sizes, not multiples of the window
WINDOWS = {2: (16, 16), 3: (16, 16, 16)}


def _policy(dims, names, weights=None, labels=LABELS):
    """A policy whose selected TEA entries are exactly `names`, with probabilities proportional to `weights`."""
    policy = make_policy(dims, labels)
    weights = weights or [1.0] * len(names)
    ids = {entry.name: entry.id for entry in policy.tea_entries}
    logits = torch.full_like(policy.tea_logits, ZERO_LOGIT)
    for name, weight in zip(names, weights, strict=True):
        logits[ids[name]] = math.log(weight)
    return policy.replace(tea_logits=logits, tea_top_k=len(names))


def _unet(dims, seed=0, classes=3):
    torch.manual_seed(seed)
    return UNet(dims, 1, classes, base_features=4, depth=2).eval()


def _image(dims, seed=0):
    return torch.randn(1, *SHAPES[dims], generator=torch.Generator().manual_seed(seed))


def _pointwise(dims):
    """A 1x1 convolution: equivariant to every spatial transform, so TTA must not change its prediction."""
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(1, 3, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, 2.0, -2.0]).view(3, 1, *([1] * dims)))
        conv.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    return conv


def _blob(dims, amplitude=3.0):
    """A smooth Gaussian bump (1, *S) off the grid centre, near 0 at the borders (like the zeros outside)."""
    shape = SHAPES[dims]
    grids = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum((g - 0.1 * (i + 1)) ** 2 for i, g in enumerate(grids))
    return (amplitude * torch.exp(-4 * r2))[None]


@pytest.mark.parametrize("dims", [2, 3])
def test_identity_only_policy_is_exactly_the_plain_prediction(dims):
    model, image = _unet(dims), _image(dims)
    plain = sliding_window_predict(model, image[None], WINDOWS[dims])[0]
    for policy in (_policy(dims, ["identity"]), None):
        result = predict_tta(model, image, policy, window=WINDOWS[dims])
        assert result.views == ["identity"] and result.weights == [1.0]
        assert torch.equal(result.probabilities, plain)


@pytest.mark.parametrize("dims", [2, 3])
def test_flips_and_turns_on_an_equivariant_model_change_nothing(dims):
    names = ["identity", "flip_x", "flip_y", "flip_all", "rot90_xy+", "rot180_xy"]
    if dims == 3:
        names += ["flip_z", "rot90_yz-"]
    model, image = _pointwise(dims), _image(dims)
    plain = sliding_window_predict(model, image[None], WINDOWS[dims])[0]
    result = predict_tta(model, image, _policy(dims, names), window=WINDOWS[dims], return_uncertainty=True)
    assert sorted(result.views) == sorted(names)
    torch.testing.assert_close(result.probabilities, plain, atol=1e-5, rtol=0)
    assert float(result.variance.max()) < 1e-10


def _flip_ensemble(model, image, axes, weights, window, output="probabilities"):
    """Hand-built ensemble: flip, predict, flip back, per view (Z, K, *S)."""
    views = []
    for axis in axes:
        dims_ = [1 + axis] if axis is not None else []
        x = image.flip(dims_) if dims_ else image
        pred = sliding_window_predict(model, x[None], window, output=output)[0]
        views.append(pred.flip(dims_) if dims_ else pred)
    return torch.stack(views), torch.tensor(weights).view(-1, *([1] * (image.dim())))


@pytest.mark.parametrize("dims", [2, 3])
def test_flip_tta_equals_a_hand_built_weighted_ensemble(dims):
    model, image, window = _unet(dims, seed=1), _image(dims, seed=2), WINDOWS[dims]
    weights = [0.5, 0.3, 0.2]
    policy = _policy(dims, ["identity", "flip_x", "flip_y"], weights)
    spacing = (0.7, 1.2, 2.5)[:dims]
    result = predict_tta(model, image, policy, window=window, spacing=spacing, return_uncertainty=True)
    assert result.views == ["identity", "flip_x", "flip_y"]
    assert result.weights == pytest.approx(weights)
    views, w = _flip_ensemble(model, image, [None, 0, 1], weights, window)
    expected = (w * views).sum(0)
    torch.testing.assert_close(result.probabilities, expected, atol=1e-6, rtol=0)
    entropy = -(expected * expected.log()).sum(0)
    torch.testing.assert_close(result.entropy, entropy, atol=1e-5, rtol=0)
    fg = 1 - views[:, 0]
    mean = (w[:, 0] * fg).sum(0)
    torch.testing.assert_close(result.variance, (w[:, 0] * (fg - mean) ** 2).sum(0), atol=1e-6, rtol=0)
    assert float(result.variance.max()) > 1e-4  # a random U-Net is not flip-equivariant
    volumes = (views.argmax(1) != 0).flatten(1).sum(1).float() * math.prod(spacing)
    torch.testing.assert_close(result.view_volumes, volumes)

    logits = predict_tta(model, image, policy, window=window, aggregate="logits").probabilities
    views, w = _flip_ensemble(model, image, [None, 0, 1], weights, window, output="logits")
    torch.testing.assert_close(logits, torch.softmax((w * views).sum(0), dim=0), atol=1e-6, rtol=0)
    assert not torch.allclose(logits, expected, atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("entry", ["rotate_xy+15", "scale_up_0.25", "scale_down_0.45"])
def test_affine_entry_then_inverse_keeps_a_smooth_map(dims, entry):
    from augsearch.ops.tea import tea_apply

    model, image, window = _pointwise(dims), _blob(dims), WINDOWS[dims]
    plain = sliding_window_predict(model, image[None], window)[0]
    policy = _policy(dims, [entry])
    result = predict_tta(model, image, policy, window=window)
    assert result.views == [entry]
    torch.testing.assert_close(result.probabilities.sum(0), torch.ones(SHAPES[dims]), atol=1e-5, rtol=0)
    # Linear interpolation of a smooth map twice (forward warp of the image, inverse warp of the prediction).
    error = (result.probabilities - plain).abs()
    assert float(error.max()) < 0.07
    assert float(error.mean()) < 0.01
    # Without the inverse the view is far from the plain map: the test sees a missing or wrong inversion.
    before, after = view_padding(SHAPES[dims], [policy.tea_selected()[0][0]], dims)
    pads = [p for axis in reversed(range(dims)) for p in (before[axis], after[axis])]
    moved = tea_apply(torch.nn.functional.pad(image, pads)[None], torch.tensor([policy.tea_selected()[0][0]]), dims)
    crop = tuple(slice(b, b + n) for b, n in zip(before, SHAPES[dims]))
    unmapped = sliding_window_predict(model, moved, window)[0][(slice(None), *crop)]
    assert float((unmapped - plain).abs().max()) > 3 * float(error.max())


def test_enlarged_grid_keeps_content_that_affine_entries_move_outward():
    shape = (19, 23, 17)
    before, after = view_padding(shape, [0], 3)
    assert before == after == [0, 0, 0]
    # Quarter turn in xy: x and y grow to the larger extent; z untouched.
    pool_ids = {e.name: e.id for e in make_policy(3, LABELS).tea_entries}
    before, after = view_padding(shape, [pool_ids["rot90_xy+"]], 3)
    assert [n + b + a for n, b, a in zip(shape, before, after)] == [23, 23, 17]
    # Scale up by 1.25 about the centre: the corners move out by about 0.25 * half the extent on each axis.
    before, after = view_padding(shape, [pool_ids["scale_up_0.25"]], 3)
    assert before == after and min(before) >= math.ceil(0.25 * (23 - 1) / 2)


def test_result_type_and_model_mode_do_not_change_with_flags():
    model, image = _unet(2), _image(2)
    model.train()
    plain = predict_tta(model, image.numpy(), None, window=(16, 16))
    assert model.training
    full = predict_tta(model, image, None, window=(16, 16), return_uncertainty=True)
    assert type(plain) is type(full) is TTAResult
    assert plain.entropy is None and plain.variance is None and plain.view_volumes is None
    assert torch.equal(plain.probabilities, full.probabilities)
    assert float(full.variance.abs().max()) == 0.0
    # One view: volume = foreground voxels of the plain argmax (spacing 1).
    assert float(full.view_volumes[0]) == float((full.probabilities.argmax(0) != 0).sum())


def test_small_volume_is_an_error_unless_padding_is_asked():
    model = _unet(2)
    image = torch.randn(1, 12, 30, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TTAError, match=r"smaller than the sliding window \(16, 16\).*pad_to_window"):
        predict_tta(model, image, None, window=16)
    padded = predict_tta(model, image, _policy(2, ["identity", "flip_y"]), window=16, pad_to_window=True)
    manual, w = _flip_ensemble(model, image, [None, 1], [0.5, 0.5], (16, 16))
    torch.testing.assert_close(padded.probabilities, (w * manual).sum(0), atol=1e-6, rtol=0)


def test_policy_and_model_that_do_not_match():
    image = _image(3)
    with pytest.raises(TTAError, match=r"policy is for 2D volumes but the image .* is 3D"):
        predict_tta(_unet(3), image, _policy(2, ["identity"]), window=16)
    two_class = _unet(3, classes=2)
    with pytest.raises(TTAError, match=r"outputs .*2, 16, 16, 16.* logits but the policy has 3 labels"):
        predict_tta(two_class, image, _policy(3, ["identity", "flip_x"]), window=16)
    with pytest.raises(TTAError, match="aggregate must be"):
        predict_tta(_unet(3), image, None, window=16, aggregate="median")
    with pytest.raises(TTAError, match="top_k must be >= 1"):
        predict_tta(_unet(3), image, _policy(3, ["identity"]), window=16, top_k=0)
    with pytest.raises(TTAError, match="channel-first"):
        predict_tta(_unet(3), image[0, 0], None, window=16)
    with pytest.raises(TTAError, match="spacing must give one positive"):
        predict_tta(_unet(3), image, None, window=16, spacing=(1.0, 1.0))


def test_top_k_overrides_the_policy():
    model, image = _unet(2), _image(2)
    policy = _policy(2, ["flip_x", "identity", "flip_y"], [0.5, 0.3, 0.2])
    result = predict_tta(model, image, policy, window=16, top_k=2)
    assert result.views == ["flip_x", "identity"] and result.weights == pytest.approx([0.625, 0.375])
    views, w = _flip_ensemble(model, image, [0, None], [0.625, 0.375], (16, 16))
    torch.testing.assert_close(result.probabilities, (w * views).sum(0), atol=1e-6, rtol=0)


def test_policy_file_gives_the_same_prediction(tmp_path):
    from augsearch.policy.io import save_policy
    from augsearch.policy.presets import policy_from_file_or_preset

    policy = _policy(3, ["identity", "flip_z", "rot180_xy"], [0.6, 0.3, 0.1])
    save_policy(policy, tmp_path / "policy.json")
    model, image = _unet(3), _image(3)
    direct = predict_tta(model, image, policy, window=16)
    loaded = policy_from_file_or_preset(tmp_path / "policy.json", 3, dict(policy.label_names))
    from_file = predict_tta(model, image, loaded, window=16)
    # Loading lives in one place: a path is refused with the function to call.
    with pytest.raises(TTAError, match="policy_from_file_or_preset"):
        predict_tta(model, image, tmp_path / "policy.json", window=16)
    assert from_file.views == direct.views
    torch.testing.assert_close(from_file.probabilities, direct.probabilities, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    policy = _policy(3, ["identity", "flip_x", "rotate_xy+15"])
    model, image = _unet(3), _image(3)
    cpu = predict_tta(model, image, policy, window=16, return_uncertainty=True)
    gpu = predict_tta(model.cuda(), image.cuda(), policy, window=16, return_uncertainty=True)
    assert gpu.probabilities.is_cuda
    torch.testing.assert_close(gpu.probabilities.cpu(), cpu.probabilities, atol=1e-4, rtol=0)
    torch.testing.assert_close(gpu.variance.cpu(), cpu.variance, atol=1e-4, rtol=0)
    np.testing.assert_allclose(gpu.view_volumes.cpu().numpy(), cpu.view_volumes.numpy(), rtol=0.05)


def test_views_invalid_at_a_voxel_are_left_out_there(monkeypatch):
    import augsearch.predict.tta as tta_module

    real = tta_module.tea_invert

    def half_invalid(pred, ids, dims, spacing=None):
        out, valid = real(pred, ids, dims, spacing=spacing)
        valid = valid.clone()
        valid[1, :, : valid.shape[2] // 2] = False  # the second view does not reach the lower half of x
        return out, valid

    monkeypatch.setattr(tta_module, "tea_invert", half_invalid)
    model, image = _unet(2, seed=4), _image(2, seed=5)
    result = predict_tta(model, image, _policy(2, ["identity", "flip_y"], [0.6, 0.4]), window=16,
                         return_uncertainty=True)
    views, w = _flip_ensemble(model, image, [None, 1], [0.6, 0.4], (16, 16))
    half = SHAPES[2][0] // 2
    torch.testing.assert_close(result.probabilities[:, :half], views[0][:, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(result.probabilities[:, half:], (w * views).sum(0)[:, half:], atol=1e-6, rtol=0)
    assert float(result.variance[:half].abs().max()) == 0.0
