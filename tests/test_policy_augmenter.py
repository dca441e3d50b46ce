"""PolicyAugmenter: a policy's TRA as a batch transform for other training loops (augsearch/policy/augmenter.py)."""

from __future__ import annotations

import pytest
import torch

from augsearch import PolicyAugmenter, load_policy, make_policy
from augsearch.errors import PolicyError
from augsearch.ops.registry import list_ops
from augsearch.policy.core import ZERO_LOGIT
from augsearch.policy.presets import POLICIES_DIR

LABELS = {"background": 0, "liver": 1, "tumour": 2}


def flip_foreground_only(dims: int = 2):
    """Foreground group: flip_x always and nothing else; background group: the identity."""
    policy = make_policy(dims, LABELS, init="identity")
    logits = policy.tra_logits.detach().clone()
    flip = policy.op_names.index("flip_x")
    logits[1, flip, :] = ZERO_LOGIT
    logits[1, flip, 1] = 0.0
    return policy.replace(tra_logits=logits)


def crops(batch: int, size: tuple[int, ...], centre_labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.randn(batch, 1, *size, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(batch, *size, dtype=torch.int64)
    centre = tuple(n // 2 for n in size)
    for b, label in enumerate(centre_labels):
        mask[(b, *centre)] = label
    return image, mask


def test_patches_centred_on_foreground_take_the_foreground_group_and_background_ones_the_other():
    augmenter = PolicyAugmenter(flip_foreground_only(), (16, 16), labels=LABELS)
    assert augmenter.margin == 0 and augmenter.crop_size == (16, 16)  # no scale or rotation can be drawn
    image, mask = crops(3, (16, 16), [0, 2, 1])
    out_image, out_mask = augmenter(image, mask)
    assert out_image.shape == (3, 1, 16, 16) and out_mask.dtype == torch.int64
    assert torch.equal(out_image[0], image[0])  # background: identity
    for b in (1, 2):  # tumour and liver both belong to the foreground group: flipped along x (torch dim 2)
        assert torch.equal(out_image[b], image[b].flip(1)) and torch.equal(out_mask[b], mask[b].flip(0))
    # an explicit anchor class overrides the centre voxel
    forced, _ = augmenter(image, mask, anchor_class=torch.tensor([1, 0, 0]))
    assert torch.equal(forced[0], image[0].flip(1)) and torch.equal(forced[1], image[1])


def test_a_seeded_augmenter_repeats_its_draws_and_other_seeds_differ():
    policy = make_policy(3, LABELS, init="uniform")
    outputs = []
    for seed in (0, 0, 1):
        augmenter = PolicyAugmenter(policy, (12, 12, 8), spacing=(1.0, 1.0, 2.5), seed=seed)
        image, mask = crops(4, augmenter.crop_size, [0, 1, 2, 0])
        outputs.append([augmenter(image, mask)[0] for _ in range(2)])
    assert augmenter.margin > 0  # scale and rotations read beyond the patch
    assert all(torch.equal(a, b) for a, b in zip(outputs[0], outputs[1]))
    assert not torch.equal(outputs[0][0], outputs[0][1])  # successive calls draw anew
    assert not torch.equal(outputs[0][0], outputs[2][0])


def test_the_packaged_learned_policy_drives_training_augmentation_in_its_own_dims():
    policy = load_policy(POLICIES_DIR / "learned" / "quickstart" / "bench2d-joint.json")
    augmenter = PolicyAugmenter(policy, (32, 32))
    image, mask = crops(8, augmenter.crop_size, [0, 1, 0, 2, 0, 1, 0, 2])
    out_image, out_mask = augmenter(image, mask)
    assert out_image.shape == (8, 1, 32, 32) and out_mask.shape == (8, 32, 32)
    assert torch.isfinite(out_image).all() and set(out_mask.unique().tolist()) <= {0, 1, 2}


@pytest.mark.parametrize(("call", "message"), [
    (lambda a: a(torch.randn(2, 1, 15, 16), torch.zeros(2, 15, 16, dtype=torch.int64)), "crop_size"),
    (lambda a: a(torch.randn(2, 1, 16, 16), torch.zeros(2, 3, 16, 16)), "not one-hot"),
    (lambda a: a(torch.randn(2, 16, 16), torch.zeros(2, 16, 16, dtype=torch.int64)), "batch and channel"),
    (lambda a: a(torch.randn(2, 1, 16, 16), torch.zeros(2, 16, 16, dtype=torch.int64), torch.zeros(3)),
     "one label value per patch"),
    (lambda a: a(torch.randn(1, 1, 16, 16), torch.full((1, 16, 16), 7)), "not labels of this policy"),
])
def test_wrong_input_is_refused_with_what_was_expected(call, message):
    augmenter = PolicyAugmenter(flip_foreground_only(), (16, 16), labels=LABELS)
    with pytest.raises(PolicyError, match=message):
        call(augmenter)


def test_a_patch_of_other_dims_or_a_bad_spacing_is_refused():
    with pytest.raises(PolicyError, match="2D policy"):
        PolicyAugmenter(flip_foreground_only(), (16, 16, 16))
    with pytest.raises(PolicyError, match="spacing"):
        PolicyAugmenter(make_policy(3, LABELS), (16, 16, 16), spacing=(1.0, 1.0))


def test_quarter_turns_are_left_out_where_the_plane_is_not_square():
    policy = make_policy(3, LABELS, init="uniform", ops=[op for op in list_ops(3) if op.startswith("rotate")])
    augmenter = PolicyAugmenter(policy, (16, 16, 8))
    image, mask = crops(16, augmenter.crop_size, [0] * 16)
    out_image, _ = augmenter(image, mask)  # augment_batch refuses rot90 bins drawn for a non-square plane
    assert out_image.shape == (16, 1, 16, 16, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_draws_and_ops_run_on_the_tensors_device():
    augmenter = PolicyAugmenter(flip_foreground_only(3), (16, 16, 16), labels=LABELS)
    image, mask = crops(3, augmenter.crop_size, [0, 2, 1])
    out_image, out_mask = augmenter(image.cuda(), mask.cuda())
    assert out_image.is_cuda and out_mask.is_cuda
    assert torch.equal(out_image[0].cpu(), image[0]) and torch.equal(out_image[1].cpu(), image[1].flip(1))
