import pytest
import torch
from torch import nn

from augsearch.errors import AugsearchError
from augsearch.predict.sliding_window import (
    importance_map,
    predict_volume_labels,
    sliding_window_predict,
    window_starts,
)


def _pointwise(dims, cin=2, k=3):
    """A 1x1 conv with fixed weights: its per-voxel output does not depend on the window placement."""
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(cin, k, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(cin * k, dtype=torch.float32).reshape(conv.weight.shape[:2] + (1,) * dims) - 2)
        conv.bias.copy_(torch.tensor([0.5, -1.0, 2.0][:k]))
    return conv


@pytest.mark.parametrize(
    "shape, window",
    [((7, 5), (4, 4)), ((3, 2), (4, 4)), ((11, 3), (4, 6)), ((5, 9, 3), (4, 4, 4)), ((2, 3, 7), (4, 4, 4))],
)
@pytest.mark.parametrize("importance", ["gaussian", "constant"])
def test_pointwise_model_exact_on_odd_sizes(shape, window, importance):
    dims = len(shape)
    model = _pointwise(dims)
    image = torch.randn(2, 2, *shape, generator=torch.Generator().manual_seed(0))
    expected_logits = model(image).detach()
    logits = sliding_window_predict(
        model, image, window, overlap=0.5, batch_size=3, importance=importance, output="logits"
    )
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    probs = sliding_window_predict(model, image, window, batch_size=5, importance=importance, num_classes=3)
    torch.testing.assert_close(probs, torch.softmax(expected_logits, 1), rtol=1e-5, atol=1e-6)
    labels = predict_volume_labels(model, image, window)
    assert torch.equal(labels, expected_logits.argmax(1))


def test_gaussian_importance_values():
    w = importance_map((8, 4))
    assert w.max() == 1
    # sigma = 1 for w=8 (centre 3.5), 0.5 for w=4 (centre 1.5); normalised by the value at the nearest grid voxels
    # (0.5 away on both axes): exponent -(3.5^2 - 0.5^2)/2 - (1.5^2 - 0.5^2)/(2 * 0.25) = -6 - 4.
    expected = torch.exp(torch.tensor(-10.0))
    torch.testing.assert_close(w[0, 0], expected.float())
    torch.testing.assert_close(w, w.flip(0).flip(1))
    assert importance_map((128, 128, 128)).min() > 0


def test_window_starts_cover_and_spread():
    assert window_starts(7, 4, 2) == [0, 2, 3]
    assert window_starts(4, 4, 2) == [0]
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    starts = window_starts(100, 16, 8)
    assert starts[0] == 0 and starts[-1] == 84
    assert max(b - a for a, b in zip(starts, starts[1:])) <= 8


def test_windows_from_all_images_are_batched_together():
    calls = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _pointwise(2)

        def forward(self, x):
            calls.append(x.shape[0])
            return self.conv(x)

    image = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    sliding_window_predict(Recorder(), image, (4, 4), overlap=0.0, batch_size=5)
    # 3 images x 4 windows = 12 windows -> batches of 5, 5, 2.
    assert calls == [5, 5, 2]


def test_bad_arguments_raise_clear_errors():
    model = _pointwise(2)
    image = torch.zeros(1, 2, 6, 6)
    with pytest.raises(AugsearchError, match="one positive size per spatial axis"):
        sliding_window_predict(model, image, (4, 4, 4))
    with pytest.raises(AugsearchError, match="overlap"):
        sliding_window_predict(model, image, (4, 4), overlap=1.0)
    with pytest.raises(AugsearchError, match="num_classes=2"):
        sliding_window_predict(model, image, (4, 4), num_classes=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_volume_with_gpu_model():
    model = _pointwise(3).cuda()
    image = torch.randn(1, 2, 9, 7, 5, generator=torch.Generator().manual_seed(2))
    out = sliding_window_predict(model, image, (4, 4, 4), output="logits")
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, model(image.cuda()).detach().cpu(), rtol=1e-4, atol=1e-4)
