import pytest
import torch
from torch.func import functional_call, jvp

from augsearch.errors import AugsearchError
from augsearch.model import UNet, model_config


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_2d_shapes_and_feature_widths():
    torch.manual_seed(0)
    model = UNet(2, in_channels=2, num_classes=3, base_features=4, max_features=12, depth=4)
    x = torch.randn(2, 2, 32, 24, generator=_seeded())
    out = model(x)
    assert out.shape == (2, 3, 32, 24)
    assert [stage[0][0].out_channels for stage in model.encoder] == [4, 8, 12, 12]
    assert model.divisor == (8, 8) and model.min_input_size() == (8, 8)


def test_3d_anisotropic_pool_kernels():
    torch.manual_seed(0)
    model = UNet(3, 1, 2, base_features=2, depth=3, pool_kernels=[[2, 2, 1], [2, 2, 2]])
    assert model.divisor == (4, 4, 2)
    out = model(torch.randn(1, 1, 8, 12, 6, generator=_seeded()))
    assert out.shape == (1, 2, 8, 12, 6)


def test_deep_supervision_train_list_eval_tensor():
    torch.manual_seed(0)
    model = UNet(2, 1, 3, base_features=2, depth=4, deep_supervision=True)
    x = torch.randn(1, 1, 16, 16, generator=_seeded())
    model.train()
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(1, 3, 16, 16), (1, 3, 8, 8), (1, 3, 4, 4)]
    model.eval()
    full = model(x)
    assert isinstance(full, torch.Tensor)
    # InstanceNorm keeps no running stats: train and eval full-resolution logits agree.
    torch.testing.assert_close(full, outs[0])


def test_bad_size_error_names_a_valid_size():
    model = UNet(2, 1, 2, base_features=2, depth=3)
    with pytest.raises(AugsearchError, match=r"\(12, 8\)"):
        model(torch.zeros(1, 1, 10, 8))
    with pytest.raises(AugsearchError, match="expects input"):
        model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(AugsearchError, match="pool_kernels"):
        UNet(2, 1, 2, depth=3, pool_kernels=[[2, 2]])


def test_config_round_trip_rebuilds_same_function():
    torch.manual_seed(0)
    model = UNet(3, 1, 2, base_features=2, depth=2, deep_supervision=True, pool_kernels=[[2, 2, 1]])
    config = model_config(model)
    assert config["pool_kernels"] == [[2, 2, 1]]
    clone = UNet.from_config(config)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 4, 4, 2, generator=_seeded())
    model.eval(), clone.eval()
    torch.testing.assert_close(clone(x), model(x))
    with pytest.raises(AugsearchError, match="unknown UNet config keys"):
        UNet.from_config({**config, "dropout": 0.1})


def test_jvp_through_model_matches_finite_difference():
    torch.manual_seed(0)
    model = UNet(2, 1, 2, base_features=2, depth=3).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangent = {k: torch.randn(v.shape, generator=_seeded(1), dtype=v.dtype) for k, v in params.items()}
    x = torch.randn(2, 1, 8, 8, generator=_seeded(2), dtype=torch.float64)

    def f(p):
        return functional_call(model, p, (x,)).square().mean(dim=(1, 2, 3))

    value, directional = jvp(f, (params,), (tangent,))
    h = 1e-6
    plus = f({k: v + h * tangent[k] for k, v in params.items()})
    minus = f({k: v - h * tangent[k] for k, v in params.items()})
    torch.testing.assert_close(directional, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(value, f(params))
