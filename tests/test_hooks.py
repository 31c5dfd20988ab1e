"""Hook, Hooks, module selection and the model summary."""
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanofit import Hook, Hooks, Learner, append_stats, model_summary, resnet, simple_cnn
from nanofit.hooks import select_modules


def test_hook_calls_fn_and_removes():
    lin = nn.Linear(3, 2)
    calls = []
    hook = Hook(lin, lambda h, m, i, o: calls.append((h, m, i[0].shape, o.shape)))
    lin(torch.zeros(4, 3))
    assert calls == [(hook, lin, (4, 3), (4, 2))]
    hook.remove()
    hook.remove()  # twice is fine
    lin(torch.zeros(4, 3))
    assert len(calls) == 1 and not lin._forward_hooks


def test_hook_as_context_manager_and_garbage_collected():
    lin = nn.Linear(3, 2)
    with Hook(lin, lambda *a: None):
        assert len(lin._forward_hooks) == 1
    assert not lin._forward_hooks
    hook = Hook(lin, lambda *a: None)
    assert len(lin._forward_hooks) == 1
    del hook
    gc.collect()
    assert not lin._forward_hooks


def test_hooks_sequence():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    seen = []
    with Hooks([model[0], model[2]], lambda h, m, i, o: seen.append(m)) as hooks:
        assert len(hooks) == 2 and hooks[1].module is model[2]
        assert [h.module for h in hooks] == [model[0], model[2]]
        model(torch.zeros(2, 3))
    assert seen == [model[0], model[2]]
    assert not model[0]._forward_hooks and not model[2]._forward_hooks


def test_select_modules():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    assert select_modules(model, nn.Linear) == [model[0], model[1][1]]
    assert select_modules(model, (nn.ReLU, nn.Linear)) == [model[0], model[1][0], model[1][1]]
    assert select_modules(model, lambda m: isinstance(m, nn.ReLU)) == [model[1][0]]
    assert select_modules(model) == [model[0], model[1][0], model[1][1]]  # leaves
    with pytest.raises(TypeError, match="mod_filter must be"):
        select_modules(model, "Linear")


def test_summary_shapes_and_parameter_counts():
    model = simple_cnn(1, 10, nfs=(4, 8))
    summary = model_summary(model, torch.zeros(2, 1, 16, 16))
    shapes = [r["output_shape"] for r in summary.rows]
    assert shapes[0] == (2, 4, 8, 8) and shapes[3] == (2, 8, 4, 4) and shapes[-1] == (2, 10)
    assert sum(r["params"] for r in summary.rows) == sum(p.numel() for p in model.parameters())
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    conv0 = summary.rows[0]
    assert conv0["mflops"] == pytest.approx(4 * 1 * 5 * 5 * 8 * 8 / 1e6)
    text = str(summary)
    assert "0.0 (Conv2d)" in text and "(2, 10)" in text and "MFLOPs" in text
    assert "MFLOPs" not in str(model_summary(model, torch.zeros(2, 1, 16, 16), flops=False))


def test_learner_summary_leaves_model_and_rng_alone():
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    from nanofit import DataLoaders, TensorLoader

    dls = DataLoaders(TensorLoader((x, y), 8, shuffle=True,
                                   generator=torch.Generator().manual_seed(0)))
    model = resnet(1, 10, nfs=(4, 8))
    learn = Learner(model, dls, F.cross_entropy)
    running = model[0].convs[0][1].running_mean.clone()
    gen_state = dls.train.generator.get_state()
    summary = learn.summary()
    assert summary.rows[-1]["output_shape"] == (8, 10)
    assert torch.equal(running, model[0].convs[0][1].running_mean)
    assert torch.equal(gen_state, dls.train.generator.get_state())
    assert model.training



def test_hooks_work_as_the_course_list():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    with Hooks(model, append_stats) as hooks:  # a Sequential: one hook per child
        assert len(hooks) == 4 and [h.module for h in hooks] == list(model)
        assert hooks[-1].module is model[3] and [h.module for h in hooks[1:3]] == [model[1],
                                                                                  model[2]]
        for _ in range(3):
            model(torch.randn(8, 3))
        del hooks[1]  # off the list and off its module
        assert len(hooks) == 3 and not model[1]._forward_hooks
        assert [h.module for h in hooks] == [model[0], model[2], model[3]]
        model(torch.randn(8, 3))
        del hooks[1:]
        assert len(hooks) == 1 and not model[2]._forward_hooks and not model[3]._forward_hooks
    assert all(not m._forward_hooks for m in model.modules())
    h = hooks[0]
    assert len(h.stats[0]) == 4 and torch.stack(h.stats[2]).t().shape == (40, 4)
    with pytest.raises(IndexError):
        hooks[5]


def test_hook_objects_keep_state_as_the_course_does():
    lin = nn.Linear(3, 2)

    def lsuv_stats(hook, mod, inp, outp):  # the course's _lsuv_stats
        hook.mean, hook.std = outp.mean(), outp.std()

    hook = Hook(lin, lsuv_stats)
    lin(torch.randn(16, 3))
    assert hook.mean.shape == () and hook.std > 0
    hook.remove()
