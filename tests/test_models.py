"""Model blocks: conv, ResBlock, simple_cnn, resnet."""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from nanofit import Learner, MetricsCB, ResBlock, conv, resnet, simple_cnn
from nanofit.cli import digits_dls


def test_conv_layers_and_bias_default():
    c = conv(3, 8, ks=3, stride=2, norm=nn.BatchNorm2d)
    assert [type(m) for m in c] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert c[0].bias is None and c[0].padding == (1, 1)
    plain = conv(3, 8, act=None)
    assert len(plain) == 1 and plain[0].bias is not None
    assert c(torch.zeros(2, 3, 9, 9)).shape == (2, 8, 5, 5)


def test_resblock_shapes_and_shortcut():
    same = ResBlock(8, 8)
    assert isinstance(same.idconv, nn.Identity) and isinstance(same.pool, nn.Identity)
    assert same(torch.randn(2, 8, 6, 6)).shape == (2, 8, 6, 6)
    down = ResBlock(8, 16, stride=2, norm=nn.BatchNorm2d)
    assert down(torch.randn(2, 8, 7, 7)).shape == (2, 16, 4, 4)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        for p in same.convs.parameters():
            p.zero_()
    assert torch.equal(same(x), F.relu(x))  # zero convs: the block is the shortcut


def test_builders_train_on_digits():
    for model in (simple_cnn(1, 10, nfs=(8, 16, 32)), resnet(1, 10, nfs=(8, 16))):
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
        torch.manual_seed(0)
        metrics = MetricsCB(acc=MulticlassAccuracy(10, average="micro"))
        learn = Learner(model, digits_dls(64, 0), F.cross_entropy, cbs=[metrics],
                        opt_func=partial(torch.optim.SGD, momentum=0.9))
        learn.fit_one_cycle(3, 0.1)
        assert metrics.history[-1]["acc"] > 0.8, type(model[0]).__name__


def test_false_and_none_mean_no_layer_as_in_the_course():
    for none in (None, False):
        c = conv(3, 8, act=none, norm=none)
        assert [type(m) for m in c] == [nn.Conv2d] and c[0].bias is not None
        block = ResBlock(8, 16, stride=2, act=none, norm=none)
        assert isinstance(block.act, nn.Identity)
        assert not any(isinstance(m, (nn.ReLU, nn.BatchNorm2d)) for m in block.modules())
        assert block(torch.randn(2, 8, 6, 6)).shape == (2, 16, 3, 3)
        for build in (simple_cnn, resnet):
            model = build(1, 10, nfs=(4, 8), act=none, norm=none)
            assert not any(isinstance(m, (nn.ReLU, nn.BatchNorm2d)) for m in model.modules())
            assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    c = conv(3, 8, act=nn.ReLU, norm=nn.BatchNorm2d)
    assert [type(m) for m in c] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] and c[0].bias is None
    assert conv(3, 8, norm=partial(nn.BatchNorm2d, momentum=0.2))[0].bias is None


def test_resblock_with_the_course_activation():
    from nanofit import GeneralRelu

    act_gr = partial(GeneralRelu, leak=0.1, sub=0.4)
    block = ResBlock(8, 16, stride=2, act=act_gr, norm=nn.BatchNorm2d)
    assert isinstance(block.act, GeneralRelu) and isinstance(block.convs[0][2], GeneralRelu)
    assert len(block.convs[1]) == 2  # conv, norm: the second conv has no activation
    assert block(torch.randn(2, 8, 6, 6)).shape == (2, 16, 3, 3)
    assert isinstance(ResBlock(8, 8).act, nn.ReLU)  # nanofit's default, on purpose
