"""The op registry as a whole, 2D and 3D: identity at bin 0, bands and signs, inverses, labels."""

import math

import pytest
import torch

from augsearch.errors import AugsearchError
from augsearch.ops import UnknownOpError, get_op, list_ops
from augsearch.ops.intensity import hash_normal, image_statistics

SHAPES = {2: (24, 24), 3: (16, 16, 16)}
CASES = [(d, name) for d in (2, 3) for name in list_ops(d)]
SPATIAL = [c for c in CASES if get_op(c[1]).spec.kind == "spatial"]
SIGNED_RECIPROCAL = {"scale", "gamma", "inverse_gamma", "intensity_scale", "contrast"}


def smooth_image(shape, n=1, channels=1):
    """Low-frequency field in [0.2, 0.8]: (n, channels, *shape)."""
    axes = [torch.linspace(0, 1, s) for s in shape]
    grid = torch.meshgrid(*axes, indexing="ij")
    field = sum(torch.sin(2 * math.pi * (0.6 + 0.2 * i) * g + i) for i, g in enumerate(grid)) / (2 * len(shape))
    return (0.5 + field).expand((n, channels) + tuple(shape)).clone()


def block_labels(shape, n=1, seed=0):
    """Piecewise-constant labels in {0, 1, 2, 5}: (n, *shape) int64."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.tensor([0, 1, 2, 5])[torch.randint(0, 4, (n,) + tuple(s // 4 for s in shape), generator=g)]
    for axis in range(len(shape)):
        coarse = coarse.repeat_interleave(4, dim=axis + 1)
    return coarse


def central(x, dims, fraction=0.5):
    index = [slice(None)] * (x.dim() - dims)
    for s in x.shape[-dims:]:
        lo = int(s * (1 - fraction) / 2)
        index.append(slice(lo, s - lo))
    return x[tuple(index)]


def all_bins(op, repeats=1):
    return torch.arange(len(op.spec.bins)).repeat_interleave(repeats)


def sampled(name, repeats, seed):
    """The op, each of its bins REPEATS times (B,) and parameters drawn for them with SEED (B, P)."""
    op = get_op(name)
    bins = all_bins(op, repeats)
    return op, bins, op.sample(bins, torch.Generator().manual_seed(seed))


def magnitude_and_sign(name, params):
    """Recover (m, sign) from params as the registry table defines them."""
    p = params[:, 0]
    if name in SIGNED_RECIPROCAL:
        return torch.exp(p.log().abs()) - 1, torch.sign(p.log())
    if name == "intensity_shift":
        return p.abs(), torch.sign(p)
    if name.startswith("rotate"):
        quarter = params[:, 1] != 0
        return torch.where(quarter, 90.0, p.abs()), torch.where(quarter, params[:, 1], torch.sign(p))
    return p, torch.zeros_like(p)


def test_registry_lists_the_method_search_space():
    assert list_ops(3) == ["scale", "rotate_xy", "rotate_xz", "rotate_yz", "flip_x", "flip_y", "flip_z", "gamma",
                           "inverse_gamma", "intensity_shift", "intensity_scale", "contrast", "blur_sharpen",
                           "noise", "low_resolution"]
    assert list_ops(2) == [n for n in list_ops(3) if n not in ("rotate_xz", "rotate_yz", "flip_z")]
    counts = {n: len(get_op(n).spec.bins) for n in list_ops(3)}
    assert counts["scale"] == 11 and counts["rotate_xy"] == 9 and counts["flip_x"] == 2
    assert counts["gamma"] == 7 and counts["blur_sharpen"] == 7 and counts["noise"] == 4
    assert sum(counts.values()) == 94
    for name in list_ops():
        spec = get_op(name).spec
        assert spec.bins[0].label == "off" and spec.bins[0].sign == 0
        exact = spec.kind == "intensity" or name.startswith("flip")
        assert (spec.tolerance == 0) == exact


def test_unknown_op_lists_valid_names():
    with pytest.raises(UnknownOpError, match="rotate_xy.*low_resolution") as info:
        get_op("rotate")
    assert isinstance(info.value, AugsearchError)


@pytest.mark.parametrize("dims,name", CASES)
def test_bin_zero_is_exact_identity(dims, name):
    op = get_op(name)
    shape = SHAPES[dims]
    x, mask = torch.rand((3, 2) + shape), block_labels(shape, 3)
    params = op.sample(torch.zeros(3, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.equal(op.apply(x, params), x)
    assert torch.equal(op.apply(mask, params, target="mask"), mask)
    assert torch.equal(op.invert(x, params), x)
    assert torch.equal(params, op.identity_params(3))


@pytest.mark.parametrize("name", list_ops(3))
def test_sampled_magnitudes_lie_in_their_band_with_their_sign(name):
    op, bins, params = sampled(name, 200, seed=1)
    mag, sign = magnitude_and_sign(name, params)
    for b, spec in enumerate(op.spec.bins[1:], start=1):
        sel = bins == b
        if name.startswith("flip"):
            assert torch.all(params[sel, 0] == 1)
            continue
        assert mag[sel].min() >= spec.low - 1e-5 and mag[sel].max() <= spec.high + 1e-5, spec
        assert mag[sel].max() - mag[sel].min() > 0.5 * (spec.high - spec.low) - 1e-6  # spread over the band
        if spec.sign:
            assert torch.all(sign[sel] == spec.sign), spec
    if name == "blur_sharpen":
        assert torch.equal(params[:, 1], torch.tensor([0.0, 1, 1, 1, -1, -1, -1]).repeat_interleave(200))


@pytest.mark.parametrize("name", ["scale", "rotate_xz", "gamma", "inverse_gamma", "intensity_shift",
                                  "intensity_scale", "contrast"])
def test_reference_signs_draw_both_directions_inside_a_bin(name):
    op = get_op(name)
    signed = [b for b, s in enumerate(op.spec.bins) if s.sign]
    bins = torch.tensor(signed).repeat_interleave(100)
    _, sign = magnitude_and_sign(name, op.sample(bins, torch.Generator().manual_seed(2), reference_signs=True))
    for b in signed:
        assert set(sign[bins == b].tolist()) == {-1.0, 1.0}
    _, fixed = magnitude_and_sign(name, op.sample(bins, torch.Generator().manual_seed(2)))
    assert torch.equal(fixed, torch.tensor([op.spec.bins[b].sign for b in bins.tolist()], dtype=torch.float32))


@pytest.mark.parametrize("dims,name", SPATIAL)
def test_spatial_ops_invert_within_tolerance(dims, name):
    op, bins, params = sampled(name, 3, seed=3)
    shape = SHAPES[dims]
    x = smooth_image(shape, len(bins), 2)
    back = op.invert(op.apply(x, params), params)
    exact = torch.ones(len(bins), dtype=torch.bool)  # flips
    if name.startswith("rotate"):
        exact = params[:, 0] == 0  # rot90 and off bins
    if name == "scale":
        exact = params[:, 0] == 1
    assert torch.equal(back[exact], x[exact])
    err = (central(back, dims) - central(x, dims)).abs().amax()
    assert err <= op.spec.tolerance
    random = torch.rand_like(x)
    assert torch.equal(op.invert(op.apply(random, params), params)[exact], random[exact])


@pytest.mark.parametrize("dims,name", SPATIAL)
def test_labels_follow_the_image_geometry_and_keep_their_values(dims, name):
    op, bins, params = sampled(name, 2, seed=4)
    shape = SHAPES[dims]
    mask = block_labels(shape, len(bins), seed=5)
    moved = op.apply(mask, params, target="mask")
    as_image = op.apply(mask.unsqueeze(1).float(), params)[:, 0]
    assert moved.dtype == torch.int64
    assert set(moved.unique().tolist()) <= {0, 1, 2, 5}
    # Where all voxels read by the linear warp share a label, the nearest-neighbour mask must carry that label.
    clean = (as_image - as_image.round()).abs() < 1e-4
    assert clean.float().mean() > 0.5
    assert torch.equal(moved[clean], as_image.round().long()[clean])


@pytest.mark.parametrize("dims,name", [c for c in CASES if get_op(c[1]).spec.kind == "intensity"])
def test_intensity_ops_leave_labels_and_invert_to_identity(dims, name):
    op, bins, params = sampled(name, 1, seed=6)
    shape = SHAPES[dims]
    mask = block_labels(shape, len(bins))
    assert torch.equal(op.apply(mask, params, target="mask"), mask)
    x = torch.rand((len(bins), 1) + shape)
    y = op.apply(x, params)
    assert torch.equal(op.invert(y, params), y)
    assert not torch.equal(y[1:], x[1:])  # every non-off bin changes the image


@pytest.mark.parametrize("dims", [2, 3])
def test_rotation_by_90_degrees_matches_the_rot90_bin(dims):
    op = get_op("rotate_xy")
    x = torch.rand((1, 1) + SHAPES[dims])
    affine = op.apply(x, torch.tensor([[90.0, 0.0]]))
    quarter = op.apply(x, torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(affine, quarter, atol=1e-4)
    assert torch.equal(quarter, torch.rot90(x, 1, (2, 3)))


def test_scale_up_magnifies_content():
    x = torch.zeros(1, 1, 21, 21)
    x[..., 8:13, 8:13] = 1  # 5x5 square at the centre
    y = get_op("scale").apply(x, torch.tensor([[1.4]]))
    assert y.sum() > 1.8 * x.sum()


def test_gamma_hand_computed_with_and_without_image_stats():
    op = get_op("gamma")
    x = torch.rand(2, 1, 8, 8) * 0.5 + 0.25
    gamma = torch.tensor([[1.5], [1 / 1.3]])
    lo, hi = 0.0, 1.0
    stats = torch.tensor([[[lo, hi, 0.5, 0.2]]]).repeat(2, 1, 1)
    y = op.apply(x, gamma, stats=stats)
    raw = ((x - lo) / (hi - lo)) ** gamma.view(2, 1, 1, 1) * (hi - lo) + lo
    dims = (1, 2, 3)
    expect = (raw - raw.mean(dims, keepdim=True)) / raw.std(dims, keepdim=True, correction=0)
    expect = expect * x.std(dims, keepdim=True, correction=0) + x.mean(dims, keepdim=True)
    assert torch.allclose(y, expect, atol=1e-5)
    # Without stats the patch's own range is used: the same as passing the patch's statistics.
    assert torch.allclose(op.apply(x, gamma), op.apply(x, gamma, stats=image_statistics(x)), atol=1e-6)
    assert not torch.allclose(op.apply(x, gamma), y, atol=1e-3)


def test_contrast_and_shift_hand_computed():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    stats = torch.tensor([[[0.0, 3.0, 1.0, 1.0]]])
    y = get_op("contrast").apply(x, torch.tensor([[1.5]]), stats=stats)
    assert torch.equal(y, torch.tensor([[[[0.0, 1.0], [2.5, 3.0]]]]))
    assert torch.equal(get_op("intensity_shift").apply(x, torch.tensor([[-0.5]])), x - 0.5)
    assert torch.equal(get_op("intensity_scale").apply(x, torch.tensor([[2.0]])), x * 2)


def test_blur_sharpen_noise_low_resolution_behave():
    x = smooth_image((32, 32), 1) + 0.1 * torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    op = get_op("blur_sharpen")
    const = torch.full((2, 1, 16, 16), 0.3)
    assert torch.allclose(op.apply(const, torch.tensor([[0.7, 1.0], [0.7, -1.0]])), const, atol=1e-6)
    blurred = op.apply(x, torch.tensor([[0.9, 1.0]]))
    sharp = op.apply(x, torch.tensor([[0.5, -1.0]]))
    tv = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert tv(blurred) < tv(x) < tv(sharp)
    assert sharp.min() >= x.min() and sharp.max() <= x.max()

    noise = get_op("noise")
    params = torch.tensor([[0.1, 7.0]])
    flat = torch.zeros(1, 1, 64, 64)
    y = noise.apply(flat, params)
    assert torch.equal(y, noise.apply(flat, params))  # same params, same field
    assert abs(y.std().item() - 0.1) < 0.005 and abs(y.mean().item()) < 0.005
    assert not torch.equal(y, noise.apply(flat, torch.tensor([[0.1, 8.0]])))
    z = hash_normal(torch.tensor([3.0, 4.0]), (100_000,))
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02 and abs(torch.corrcoef(z)[0, 1]) < 0.02

    ramp = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 4).contiguous()
    low = get_op("low_resolution").apply(ramp, torch.tensor([[0.5]]))
    # 8 voxels -> 4 at positions 0.5, 2.5, 4.5, 6.5 (linear), each repeated twice (nearest).
    assert torch.allclose(low[0, 0, :, 0], torch.tensor([0.5, 0.5, 2.5, 2.5, 4.5, 4.5, 6.5, 6.5]))


def test_bad_bins_and_targets_raise_clear_errors():
    op = get_op("gamma")
    with pytest.raises(AugsearchError, match=r"\[0, 6\]"):
        op.sample(torch.tensor([7]), torch.Generator())
    with pytest.raises(AugsearchError, match="1-D integer"):
        op.sample(torch.tensor([[1]]), torch.Generator())
    with pytest.raises(AugsearchError, match="target"):
        get_op("scale").apply(torch.rand(1, 1, 4, 4), torch.tensor([[1.1]]), target="label")
    with pytest.raises(AugsearchError, match="needs equal extents"):
        get_op("rotate_xy").apply(torch.rand(1, 1, 4, 6), torch.tensor([[0.0, 1.0]]))
