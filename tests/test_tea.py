"""TEA pool: sizes and names, determinism, exact and approximate inverses, validity, margin."""

import math

import pytest
import torch
import torch.nn.functional as F

from augsearch.errors import AugsearchError
from augsearch.ops.tea import (
    tea_apply,
    tea_entry_by_name,
    tea_invert,
    tea_margin,
    tea_pool,
)

SHAPES = {2: (24, 24), 3: (16, 16, 16)}
EXACT_SPATIAL = ("flip", "rot90", "rot180")


def smooth(shape, n):
    axes = torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape], indexing="ij")
    field = 0.5 + sum(torch.sin(2 * math.pi * (0.6 + 0.2 * i) * a + i) for i, a in enumerate(axes)) / (2 * len(shape))
    return field.expand((n, 2) + tuple(shape)).clone()


def test_pool_sizes_names_and_ids():
    pool3, pool2 = tea_pool(3), tea_pool(2)
    assert len(pool3) == 84 and len(pool2) == 65
    for pool in (pool3, pool2):
        assert [e.id for e in pool] == list(range(len(pool)))
        assert len({e.name for e in pool}) == len(pool)
        assert pool[0].name == "identity" and pool[-1].name == "flip_all"
    # The reference's ids for the entries its TEA initialisation singles out (METHOD 3.4).
    assert [pool3[i].name for i in (0, 29, 30, 31, 34, 37, 40, 83)] == [
        "identity", "flip_x", "flip_y", "flip_z", "rot180_yz", "rot180_xz", "rot180_xy", "flip_all"]
    assert pool3[1].name == "scale_up_0.05" and pool3[1].value == pytest.approx(1.05)
    assert pool3[2].value == pytest.approx(1 / 1.05)
    assert tea_entry_by_name(3, "rotate_xy+15").value == 15.0
    assert tea_entry_by_name(2, "rot90_xy+").id == 19
    assert tea_entry_by_name(3, "gamma_down_0.3").value == pytest.approx(1 / 1.3)
    assert sum(e.spatial for e in pool3) == 1 + 10 + 18 + 3 + 9 + 1
    assert sum(not e.spatial for e in pool2) == 42
    with pytest.raises(AugsearchError, match="identity.*flip_all"):
        tea_entry_by_name(2, "rotate_yz+5")


@pytest.mark.parametrize("dims", [2, 3])
def test_entries_are_deterministic_and_change_the_image(dims):
    pool = tea_pool(dims)
    ids = torch.arange(len(pool))
    x = smooth(SHAPES[dims], len(pool)) + 0.05 * torch.rand((len(pool), 2) + SHAPES[dims])
    a, b = tea_apply(x, ids, dims), tea_apply(x, ids, dims)
    assert torch.equal(a, b)
    assert torch.equal(a[0], x[0])
    changed = (a - x).flatten(1).abs().amax(1) > 1e-4
    assert changed[1:].all()
    # Each sample gets its own entry: batching order does not matter.
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(tea_apply(x[perm], ids[perm], dims), a[perm], atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_spatial_entries_invert(dims):
    pool = tea_pool(dims)
    shape = SHAPES[dims]
    ids = torch.tensor([e.id for e in pool if e.spatial])
    names = [pool[i].name for i in ids.tolist()]
    exact = torch.tensor([n.startswith(EXACT_SPATIAL) or n in ("identity", "flip_all") for n in names])
    noise = torch.rand((len(ids), 3) + shape)
    back, valid = tea_invert(tea_apply(noise, ids, dims), ids, dims)
    assert torch.equal(back[exact], noise[exact])  # bitwise
    assert valid[exact].all()
    # Affine entries on a smooth image padded by tea_margin: valid on the whole original region, back within
    # tolerance away from the content's edge (where the forward warp mixed content with the zero padding).
    margin = tea_margin(dims, ids, shape)
    x = smooth(shape, len(ids))
    padded = F.pad(x, [margin, margin] * dims)
    back, valid = tea_invert(tea_apply(padded, ids, dims), ids, dims)
    inner = (slice(None), slice(None)) + (slice(margin, -margin),) * dims
    assert valid[inner].all()
    centre = (slice(None), slice(None)) + tuple(slice(s // 4, s - s // 4) for s in shape)
    assert (back[inner][centre] - x[centre]).abs().amax() <= 0.03
    assert torch.equal(back[inner][exact], x[exact])
    # Without padding, rotations and scale-ups lose the borders: the validity mask says so. Scale-downs lose
    # nothing (their inverse reads only the centre).
    _, valid = tea_invert(tea_apply(x, ids, dims), ids, dims)
    loses = torch.tensor([n.startswith(("rotate", "scale_up")) for n in names])
    assert torch.equal(valid.flatten(1).all(1), ~loses)


@pytest.mark.parametrize("dims", [2, 3])
def test_intensity_entries_invert_to_identity_and_keep_logits(dims):
    pool = tea_pool(dims)
    ids = torch.tensor([e.id for e in pool if not e.spatial])
    pred = torch.randn((len(ids), 4) + SHAPES[dims])
    back, valid = tea_invert(pred, ids, dims)
    assert torch.equal(back, pred) and valid.all() and valid.shape == (len(ids), 1) + SHAPES[dims]


def test_flip_and_rotation_entries_do_what_their_names_say():
    x = torch.rand(1, 1, 6, 6, 6)
    one = lambda name: tea_apply(x, torch.tensor([tea_entry_by_name(3, name).id]), 3)  # noqa: E731
    assert torch.equal(one("flip_y"), x.flip(3))
    assert torch.equal(one("flip_all"), x.flip(2, 3, 4))
    assert torch.equal(one("rot90_xz+"), torch.rot90(x, 1, (2, 4)))
    assert torch.equal(one("rot90_yz-"), torch.rot90(x, -1, (3, 4)))
    assert torch.equal(one("rot180_xy"), torch.rot90(x, 2, (2, 3)))


def test_margin_and_errors():
    assert tea_margin(3, [0, 29, 30, 83, 41], (32, 32, 32)) == 0
    # scale_down_0.45 keeps content; scale_up_0.45 magnifies 1.45x: ceil(0.45 * 15.5) + 1.
    assert tea_margin(2, [tea_entry_by_name(2, "scale_up_0.45").id], (32, 32)) == 8
    with pytest.raises(AugsearchError, match=r"\[0, 64\]"):
        tea_apply(torch.rand(1, 1, 4, 4), torch.tensor([65]), 2)
    with pytest.raises(AugsearchError, match="spatial dims"):
        tea_apply(torch.rand(1, 1, 4, 4), torch.tensor([0]), 3)
