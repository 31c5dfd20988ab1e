"""Initialisation: init_weights, GeneralRelu, LSUV."""
from functools import partial

import pytest
import torch
from torch import nn

from nanofit import GeneralRelu, init_weights, lsuv_init, simple_cnn


def test_general_relu_values():
    x = torch.tensor([-2.0, -0.5, 0.0, 1.0, 8.0])
    assert torch.equal(GeneralRelu()(x), torch.relu(x))
    assert torch.allclose(GeneralRelu(leak=0.1)(x), torch.tensor([-0.2, -0.05, 0.0, 1.0, 8.0]))
    assert torch.allclose(GeneralRelu(leak=0.1, sub=0.4, maxv=6.0)(x),
                          torch.tensor([-0.6, -0.45, -0.4, 0.6, 6.0]))
    assert torch.allclose(GeneralRelu(sub=0.0)(x), torch.relu(x))


def test_init_weights_is_kaiming_for_conv_and_linear_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 500), nn.BatchNorm1d(500))
    bn_weight = model[1].weight.clone()
    model.apply(partial(init_weights, leaky=0.0))
    std = model[0].weight.std().item()
    assert std == pytest.approx((2 / 1000) ** 0.5, rel=0.05)  # kaiming: gain sqrt(2) / sqrt(fan_in)
    assert torch.count_nonzero(model[0].bias) == 0
    assert torch.equal(model[1].weight, bn_weight)
    model.apply(partial(init_weights, leaky=1.0))  # a linear 'ReLU': gain 1
    assert model[0].weight.std().item() == pytest.approx((1 / 1000) ** 0.5, rel=0.05)


def test_lsuv_gives_unit_variance_outputs():
    torch.manual_seed(0)
    model = simple_cnn(1, 10, nfs=(8, 16, 32), act=partial(GeneralRelu, leak=0.1, sub=0.4),
                       norm=None)
    xb = torch.randn(64, 1, 16, 16) * 3 + 1
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    results = lsuv_init(model, xb)
    assert len(results) == len(layers)
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o)) for m in layers]
    with torch.no_grad():
        model(xb)
    for h in hooks:
        h.remove()
    for m in layers:
        assert abs(outputs[m].std().item() - 1) < 0.1
        assert abs(outputs[m].mean().item()) < 0.1
    assert all(not m._forward_hooks for m in model.modules())


def test_lsuv_names_a_layer_the_forward_never_uses():
    model = nn.Sequential(nn.Linear(4, 4))
    unused = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="did not run in model"):
        lsuv_init(model, torch.randn(8, 4), mods=[unused])
