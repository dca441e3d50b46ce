"""augment_batch: composition order, the margin, exact pass-through, rot90 availability, devices."""

import pytest
import torch

from augsearch.augment import augment_batch, required_margin, unavailable_bins
from augsearch.errors import AugsearchError
from augsearch.ops import get_op, list_ops
from augsearch.ops.intensity import image_statistics
from augsearch.ops.registry import apply_params
from augsearch.ops.spatial import centre_crop


def bins_for(names, **chosen):
    """(1, n_ops) bins: op name -> bin index (others off)."""
    return torch.tensor([[chosen.get(n, 0) for n in names]])


def uniform_bins(names, batch, seed, patch):
    g = torch.Generator().manual_seed(seed)
    cols = []
    for n in names:
        count = len(get_op(n).spec.bins)
        col = torch.randint(0, count, (batch,), generator=g)
        bad = unavailable_bins(n, patch)
        cols.append(torch.where(torch.isin(col, torch.tensor(bad, dtype=torch.long)), 0, col))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("patch", [(40, 40), (16, 16, 16), (16, 16, 6)])
def test_margin_keeps_padding_out_of_the_patch(patch):
    names = list_ops(len(patch))
    margin = required_margin(patch, names)
    crop = tuple(p + 2 * margin for p in patch)
    spatial = [n for n in names if n == "scale" or n.startswith("rotate")]
    # Largest scale-down band ("-0.45") and the outermost angle bins, both signs, in every plane.
    rows = []
    for sign_pick in ((6, 6, 6), (5, 6, 5), (6, 5, 6), (5, 5, 5)):
        chosen = {"scale": 10}
        chosen.update({n: sign_pick[i] for i, n in enumerate(s for s in spatial if s != "scale")})
        rows.append(bins_for(names, **chosen))
    bins = torch.cat(rows).repeat(3, 1)
    image = torch.ones((len(bins), 1) + crop)
    mask = torch.ones((len(bins),) + crop, dtype=torch.long)
    out, out_mask = augment_batch(image, mask, bins, names, patch, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)
    assert torch.equal(out_mask, torch.ones_like(out_mask))


def test_margin_is_tight_at_the_extreme_affine():
    patch = (40, 40)
    margin = required_margin(patch, ["scale", "rotate_xy"])
    params = {"scale": torch.tensor([[1 / 1.5]]), "rotate_xy": torch.tensor([[30.0, 0.0]])}
    for m, full in ((margin, True), (margin - 2, False)):
        crop = tuple(p + 2 * m for p in patch)
        out, _ = apply_params(torch.ones((1, 1) + crop), None, params, patch, None)
        assert bool((out > 1 - 1e-5).all()) == full


def test_margin_values():
    assert required_margin((64, 64, 64), ["gamma", "flip_x"]) == 0
    # Scale only: reading 1.5x as far from the centre: ceil(1.5 * 31.5 - 31.5) + 1.
    assert required_margin((64, 64, 64), ["scale"]) == 17
    # Rotation only, one plane: the corner (31.5, 31.5) at 30 degrees reaches 31.5 * (cos + sin) = 43.03.
    assert required_margin((64, 64), ["rotate_xy"]) == 13
    assert required_margin((64, 64, 64), list_ops(3)) >= required_margin((64, 64, 64), ["scale", "rotate_xy"])


@pytest.mark.parametrize("dims", [2, 3])
def test_identity_selection_is_an_exact_crop(dims):
    patch = (12,) * dims
    names = list_ops(dims)
    crop = (20,) * dims
    image = torch.rand((3, 2) + crop)
    mask = torch.randint(0, 3, (3,) + crop)
    out, out_mask = augment_batch(image, mask, torch.zeros(3, len(names), dtype=torch.long), names, patch,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, centre_crop(image, patch)) and torch.equal(out_mask, centre_crop(mask, patch))


def test_planted_flip_and_gamma_match_the_ops_applied_by_hand():
    names = list_ops(3)
    patch, crop = (8, 8, 8), (12, 12, 12)
    image = torch.rand((2, 1) + crop) + 0.5
    mask = torch.randint(0, 4, (2,) + crop)
    bins = torch.cat([bins_for(names, flip_x=1, gamma=2), bins_for(names, flip_z=1, gamma=5)])
    out, out_mask = augment_batch(image, mask, bins, names, patch, generator=torch.Generator().manual_seed(9))

    g = torch.Generator().manual_seed(9)  # the same draws, op by op in op_names order
    params = {n: get_op(n).sample(bins[:, j], g) for j, n in enumerate(names)}
    assert params["gamma"][0, 0] < 1 < params["gamma"][1, 0]  # bin 2 = "-0.1" (gamma < 1), bin 5 = "+0.5"
    by_hand = get_op("gamma").apply(centre_crop(image, patch), params["gamma"], stats=image_statistics(image))
    expect = torch.stack([by_hand[0].flip(1), by_hand[1].flip(3)])
    expect_mask = torch.stack([centre_crop(mask, patch)[0].flip(0), centre_crop(mask, patch)[1].flip(2)])
    assert torch.allclose(out, expect, atol=1e-6)
    assert torch.equal(out_mask, expect_mask)


def test_rot90_groups_and_unavailable_planes():
    names = ["rotate_xy", "rotate_yz"]
    patch, crop = (6, 6, 6), (6, 6, 6)
    image = torch.rand((4, 1) + crop)
    mask = torch.randint(0, 3, (4,) + crop)
    bins = torch.tensor([[7, 0], [8, 0], [0, 7], [0, 0]])
    out, out_mask = augment_batch(image, mask, bins, names, patch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0], torch.rot90(image[0], 1, (1, 2)))
    assert torch.equal(out[1], torch.rot90(image[1], -1, (1, 2)))
    assert torch.equal(out[2], torch.rot90(image[2], 1, (2, 3)))
    assert torch.equal(out[3], image[3])
    assert torch.equal(out_mask[2], torch.rot90(mask[2], 1, (1, 2)))

    assert unavailable_bins("rotate_xz", (128, 128, 8)) == [7, 8]
    assert unavailable_bins("rotate_xy", (128, 128, 8)) == []
    assert unavailable_bins("gamma", (64, 64)) == []
    with pytest.raises(AugsearchError, match="unavailable"):
        augment_batch(torch.rand(1, 1, 6, 6, 4), torch.zeros(1, 6, 6, 4, dtype=torch.long), torch.tensor([[0, 7]]),
                      names, (6, 6, 4), generator=torch.Generator())


@pytest.mark.parametrize("dims", [2, 3])
def test_full_policy_labels_follow_the_image(dims):
    patch = (16,) * dims
    names = [n for n in list_ops(dims) if get_op(n).spec.kind == "spatial"]
    margin = required_margin(patch, names)
    crop = tuple(p + 2 * margin for p in patch)
    g = torch.Generator().manual_seed(1)
    coarse = torch.randint(0, 3, (6,) + tuple(c // 8 + 1 for c in crop), generator=g)
    for axis in range(dims):
        coarse = coarse.repeat_interleave(8, dim=axis + 1)
    mask = coarse[(slice(None),) + tuple(slice(0, c) for c in crop)].contiguous()
    bins = uniform_bins(names, 6, 2, patch)
    out, out_mask = augment_batch(mask.unsqueeze(1).float(), mask, bins, names, patch,
                                  generator=torch.Generator().manual_seed(3))
    clean = (out[:, 0] - out[:, 0].round()).abs() < 1e-4
    assert clean.float().mean() > 0.5
    assert torch.equal(out_mask[clean], out[:, 0].round().long()[clean])
    assert set(out_mask.unique().tolist()) <= {0, 1, 2}


def test_same_generator_same_result_and_stats_are_used():
    names = list_ops(2)
    patch = (16, 16)
    crop = tuple(p + 2 * required_margin(patch, names) for p in patch)
    image = torch.rand((5, 2) + crop)
    mask = torch.randint(0, 2, (5,) + crop)
    bins = uniform_bins(names, 5, 0, patch)
    a = augment_batch(image, mask, bins, names, patch, generator=torch.Generator().manual_seed(4))
    b = augment_batch(image, mask, bins, names, patch, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (5, 2, 16, 16) and a[1].shape == (5, 16, 16)
    gamma_only = torch.zeros(5, len(names), dtype=torch.long)
    gamma_only[:, names.index("gamma")] = 6
    stats = image_statistics(image)
    stats[..., 0], stats[..., 1] = -5.0, 5.0  # a much wider image-level range changes the gamma curve
    c = augment_batch(image, mask, gamma_only, names, patch, generator=torch.Generator().manual_seed(4))
    d = augment_batch(image, mask, gamma_only, names, patch, generator=torch.Generator().manual_seed(4),
                      image_stats=stats)
    assert not torch.allclose(c[0], d[0], atol=1e-3)


@pytest.mark.parametrize("dims", [2, 3])
def test_ops_no_sample_draws_are_left_out_and_the_result_is_unchanged(dims, monkeypatch):
    """Composing only the drawn ops equals composing every op (bin 0 is the exact identity), bit for bit."""
    import augsearch.augment as augment_module

    names = list_ops(dims)
    patch = (16,) * dims
    crop = tuple(p + 2 * required_margin(patch, names) for p in patch)
    image = torch.rand((4, 1) + crop, generator=torch.Generator().manual_seed(0))
    mask = torch.randint(0, 3, (4,) + crop, generator=torch.Generator().manual_seed(1))
    bins = uniform_bins(names, 4, 2, patch)
    off = [names.index(n) for n in ("scale", "gamma", "noise", "flip_y")]
    bins[:, off] = 0  # four ops that no sample draws
    composed = []

    def recording(image, mask, params, *args):
        composed.append(sorted(params))
        return apply_params(image, mask, params, *args)

    monkeypatch.setattr(augment_module, "apply_params", recording)
    left_out = augment_batch(image, mask, bins, names, patch, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)  # every op sampled and composed, in the same order
    every_op = {n: get_op(n).sample(bins[:, j], generator, False) for j, n in enumerate(names)}
    reference = apply_params(image, mask, every_op, patch, image_statistics(image))
    assert composed == [sorted(set(names) - {names[j] for j in off})]
    assert torch.equal(left_out[0], reference[0]) and torch.equal(left_out[1], reference[1])


def test_bad_inputs_raise_clear_errors():
    names = ["gamma"]
    image, mask = torch.rand(2, 1, 10, 10), torch.zeros(2, 10, 10, dtype=torch.long)
    with pytest.raises(AugsearchError, match="even"):
        augment_batch(image, mask, torch.zeros(2, 1, dtype=torch.long), names, (7, 7))
    with pytest.raises(AugsearchError, match=r"\(B, n_ops\)"):
        augment_batch(image, mask, torch.zeros(2, 2, dtype=torch.long), names, (8, 8))
    with pytest.raises(AugsearchError, match="not defined for 2D"):
        augment_batch(image, mask, torch.zeros(2, 1, dtype=torch.long), ["flip_z"], (8, 8))
    with pytest.raises(AugsearchError, match="unknown op"):
        required_margin((8, 8), ["spin"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_deterministic_ops():
    names = list_ops(3)
    patch = (16, 16, 16)
    crop = tuple(p + 2 * required_margin(patch, names) for p in patch)
    image = torch.rand((4, 1) + crop)
    mask = torch.randint(0, 3, (4,) + crop)
    deterministic = {"flip_x": 1, "flip_y": 1, "flip_z": 1, "rotate_xy": 7, "rotate_yz": 8}
    bins = torch.tensor([[deterministic.get(n, 0) for n in names]] * 4)
    bins[1:, names.index("rotate_xy")] = 0
    cpu = augment_batch(image, mask, bins, names, patch, generator=torch.Generator().manual_seed(0))
    cuda = augment_batch(image.cuda(), mask.cuda(), bins.cuda(), names, patch,
                         generator=torch.Generator(device="cuda").manual_seed(0))
    assert cuda[0].device.type == "cuda"
    assert torch.equal(cpu[0], cuda[0].cpu()) and torch.equal(cpu[1], cuda[1].cpu())
    # Random full policy runs on CUDA and keeps labels in their set.
    bins = uniform_bins(names, 4, 1, patch).cuda()
    out, out_mask = augment_batch(image.cuda(), mask.cuda(), bins, names, patch,
                                  generator=torch.Generator(device="cuda").manual_seed(0))
    assert out.is_cuda and set(out_mask.unique().tolist()) <= {0, 1, 2}
