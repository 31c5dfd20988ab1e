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


def _relu_outputs(model, xb):
    relus = [m for m in model.modules() if isinstance(m, GeneralRelu)]
    out = {}
    handles = [m.register_forward_hook(lambda m, i, o: out.__setitem__(m, o)) for m in relus]
    with torch.no_grad():
        model(xb)
    for h in handles:
        h.remove()
    return [out[m] for m in relus]


def test_lsuv_in_the_course_form_normalises_each_activation():
    torch.manual_seed(0)
    act_gr = partial(GeneralRelu, leak=0.1, sub=0.4)
    model = simple_cnn(1, 10, nfs=(8, 16, 32), act=act_gr, norm=None)
    xb = torch.randn(64, 1, 16, 16)
    relus = [o for o in model.modules() if isinstance(o, GeneralRelu)]
    convs = [o for o in model.modules() if isinstance(o, nn.Conv2d)]
    for ms in zip(relus, convs):
        lsuv_init(model, *ms, xb)
    for out in _relu_outputs(model, xb):
        assert abs(out.mean().item()) < 0.05 and abs(out.std().item() - 1) < 0.05
    assert all(not m._forward_hooks for m in model.modules())


def test_lsuv_pairs_match_the_course_form():
    act_gr = partial(GeneralRelu, leak=0.1, sub=0.4)
    xb = torch.randn(64, 1, 16, 16)
    models = []
    for course_form in (True, False):
        torch.manual_seed(0)
        model = simple_cnn(1, 10, nfs=(8, 16), act=act_gr, norm=None)
        pairs = list(zip([o for o in model.modules() if isinstance(o, GeneralRelu)],
                         [o for o in model.modules() if isinstance(o, nn.Conv2d)]))
        if course_form:
            results = [lsuv_init(model, m, m_in, xb)[0] for m, m_in in pairs]
        else:
            results = lsuv_init(model, xb, mods=pairs, max_iter=100)  # the course form's
        assert len(results) == 2
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_lsuv_course_form_needs_a_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(TypeError, match="needs the layer m_in"):
        lsuv_init(model, model[1], torch.randn(8, 4), torch.randn(8, 4))


def test_init_weights_leaves_other_modules_alone_and_zeroes_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), GeneralRelu(0.1, 0.4), nn.BatchNorm2d(8))
    bn = [p.clone() for p in model[2].parameters()]
    model.apply(partial(init_weights, leaky=0.1))
    assert torch.count_nonzero(model[0].bias) == 0
    assert all(torch.equal(a, b) for a, b in zip(bn, model[2].parameters()))
