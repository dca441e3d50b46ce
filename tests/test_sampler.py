"""Class-anchored patch sampler: fractions, anchors, padding, fallbacks, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from augsearch.data.dataset import Case
from augsearch.data.sampler import PatchSampler
from augsearch.errors import DatasetError


def make_case(label: np.ndarray, case_id: str = "c", channels: int = 1) -> Case:
    """Image channel k = 1000 * k + flat voxel index + 1: every voxel identifiable, and never 0 (padding is 0)."""
    flat = np.arange(label.size, dtype=np.float32).reshape(label.shape) + 1
    image = np.stack([flat + 1000 * k for k in range(channels)]).astype(np.float32)
    dims = label.ndim
    return Case(case_id, image, label.astype(np.uint8), (1.0,) * dims, (1.0,) * dims, label.shape, np.eye(4))


def _cases_2d():
    a = np.zeros((20, 20), np.uint8)
    a[5:9, 5:9] = 1
    a[15, 15] = 2
    b = np.zeros((16, 12), np.uint8)
    b[2:4, 3:10] = 1
    empty = np.zeros((10, 10), np.uint8)
    return [make_case(a, "a"), make_case(b, "b"), make_case(empty, "empty")]


def test_fractions_and_class_choice():
    sampler = PatchSampler(_cases_2d(), (6, 6), fg_fraction=0.3, seed=0)
    anchors, cases = [], []
    for _ in range(250):
        batch = sampler.sample(8)
        anchors.append(batch.anchor_class.numpy())
        cases.append(batch.case_index.numpy())
    anchor, case = np.concatenate(anchors), np.concatenate(cases)
    fg = anchor != 0
    assert abs(fg.mean() - 0.3) < 0.01  # stochastic rounding keeps the batch share close to the target
    # FG patches: cases a and b uniformly (the empty case never); in case a, classes 1 and 2 uniformly.
    assert not np.any(fg & (case == 2))
    assert abs((case[fg] == 0).mean() - 0.5) < 0.05
    assert abs((anchor[fg & (case == 0)] == 2).mean() - 0.5) < 0.07
    # BG patches: all three cases uniformly.
    for ci in range(3):
        assert abs((case[~fg] == ci).mean() - 1 / 3) < 0.04
    assert sampler.sample(10, fg_fraction=1.0).anchor_class.ne(0).all()
    assert sampler.sample(10, fg_fraction=0.0).anchor_class.eq(0).all()


def test_anchor_is_crop_centre_and_uniform_over_class_voxels():
    cases = _cases_2d()
    sampler = PatchSampler(cases, (5, 4), margin=2, fg_fraction=1.0, seed=1)
    batch = sampler.sample(400)
    assert batch.image.shape == (400, 1, 9, 8) and batch.mask.shape == (400, 9, 8)
    assert batch.image.dtype == torch.float32 and batch.mask.dtype == torch.int64
    centre = (9 // 2, 8 // 2)
    seen = set()
    for b in range(400):
        case = cases[int(batch.case_index[b])]
        flat = int(batch.image[b, 0, centre[0], centre[1]].item()) - 1
        pos = np.unravel_index(flat, case.label.shape)
        assert case.label[pos] == batch.anchor_class[b] == batch.mask[b, centre[0], centre[1]]
        seen.add((int(batch.case_index[b]), flat))
    # Every foreground voxel of both cases is reachable (16 + 1 + 14 voxels).
    assert len(seen) == 31


def test_border_padding_matches_reference_crop():
    label = np.zeros((7, 6, 5), np.uint8)
    label[0, 0, 0] = 1
    case = make_case(label, channels=2)
    batch = PatchSampler([case], (4, 4, 4), margin=1, fg_fraction=1.0, seed=0).sample(2)
    padded_image = np.pad(case.image, ((0, 0), (3, 3), (3, 3), (3, 3)))
    padded_label = np.pad(label, 3)
    # Anchor (0, 0, 0): crop of 6 starts at -3 on each axis -> padded index 0.
    np.testing.assert_array_equal(batch.image[0].numpy(), padded_image[:, 0:6, 0:6, 0:6])
    np.testing.assert_array_equal(batch.mask[0].numpy(), padded_label[0:6, 0:6, 0:6])
    assert batch.image[0, :, :3].abs().sum() == 0 and batch.image[0, 1, 3, 3, 3] == 1001


def test_reproducible_and_generator_override():
    a = PatchSampler(_cases_2d(), (6, 6), seed=7).sample(16)
    b = PatchSampler(_cases_2d(), (6, 6), seed=7).sample(16)
    c = PatchSampler(_cases_2d(), (6, 6), seed=8).sample(16)
    for field in ("image", "mask", "anchor_class", "case_index"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.image, c.image)
    s = PatchSampler(_cases_2d(), (6, 6), seed=0)
    g1 = s.sample(16, generator=np.random.default_rng(7))
    g2 = s.sample(16, generator=np.random.default_rng(7))
    assert torch.equal(g1.image, g2.image) and torch.equal(g1.anchor_class, g2.anchor_class)


def test_fallbacks():
    empty = make_case(np.zeros((8, 8), np.uint8))
    batch = PatchSampler([empty], (4, 4), fg_fraction=1.0, seed=0).sample(20)
    assert batch.anchor_class.eq(0).all()  # no foreground anywhere: background-anchored
    full = make_case(np.ones((8, 8), np.uint8))
    batch = PatchSampler([full], (4, 4), fg_fraction=0.0, seed=0).sample(20)
    assert batch.anchor_class.eq(1).all()  # no background anywhere: anchor_class tells the truth


def test_bad_inputs():
    with pytest.raises(DatasetError, match="2 sizes"):
        PatchSampler(_cases_2d(), (4, 4, 4))
    with pytest.raises(DatasetError, match=r"a value in \[0, 1\]"):
        PatchSampler(_cases_2d(), (4, 4), fg_fraction=1.5)
    unlabelled = make_case(np.zeros((4, 4), np.uint8))
    unlabelled.label = None
    with pytest.raises(DatasetError, match="a labelled case"):
        PatchSampler([unlabelled], (4, 4))
