"""Mixed precision, gradient accumulation and clipping, augmentation, MixUp/CutMix."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanofit import (
    Callback,
    CutMix,
    DataLoaders,
    GradAccumCB,
    GradClipCB,
    Learner,
    MetricsCB,
    MixedPrecision,
    MixUp,
    TensorLoader,
    compose,
    random_crop,
    random_erase,
    random_flip,
)
from tests.helpers import make_dls, make_model


def test_bf16_mixed_precision_on_cpu_trains():
    dtypes = []

    class Look(Callback):
        order = 100

        def after_predict(self, learn):
            dtypes.append(learn.preds.dtype)

    learn = Learner(make_model(), make_dls(n_train=80), F.cross_entropy, lr=0.5,
                    cbs=[MixedPrecision(), MetricsCB(), Look()])
    learn.fit(6)
    losses = [r["loss"] for r in learn.metrics.history if r["train"] == "train"]
    assert losses[-1] < losses[0]
    assert dtypes[0] == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())


def accum_weights(bs, cbs, n=32):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    learn = Learner(model, DataLoaders(TensorLoader((x, y), bs)), F.mse_loss, lr=0.1, cbs=cbs)
    learn.fit(3, valid=False)
    return learn


def test_accumulation_equals_one_large_batch_and_records_the_true_loss():
    big = accum_weights(16, [])
    losses = []

    class Losses(Callback):
        order = 100

        def after_batch(self, learn):
            true = F.mse_loss(learn.preds, learn.batch[1]).item()
            losses.append((learn.loss.item(), true))

    acc = accum_weights(4, [GradAccumCB(16), Losses()])
    for a, b in zip(big.model.parameters(), acc.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(recorded == pytest.approx(true) for recorded, true in losses)  # not scaled by 4/16
    # 36 samples: the last group of 4 makes a smaller step, as a last batch of 4 would
    big, acc = accum_weights(16, [], n=36), accum_weights(4, [GradAccumCB(16)], n=36)
    for a, b in zip(big.model.parameters(), acc.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_clipping_bounds_the_gradient_norm():
    norms = []

    class Norm(Callback):
        order = 50

        def after_backward(self, learn):
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in learn.model.parameters()]))

    clip = GradClipCB(0.05)
    Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1, cbs=[clip, Norm()]).fit(1)
    assert max(n.item() for n in norms) <= 0.05 + 1e-6
    assert clip.last_norm is not None and clip.last_norm.item() > 0.05  # it did clip


def test_accumulation_clips_the_summed_gradient_at_the_step():
    big = accum_weights(16, [GradClipCB(0.01)])
    acc = accum_weights(4, [GradAccumCB(16), GradClipCB(0.01)])
    for a, b in zip(big.model.parameters(), acc.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # 36 samples: the epoch's last, smaller step (4 samples) is clipped as a last batch would be
    big = accum_weights(16, [GradClipCB(0.01)], n=36)
    acc = accum_weights(4, [GradAccumCB(16), GradClipCB(0.01)], n=36)
    for a, b in zip(big.model.parameters(), acc.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_precision_accumulation_clipping_and_mixup_together():
    calls = []

    class Spy(MixUp):
        def get_loss(self, learn):
            calls.append(learn.preds.dtype)
            super().get_loss(learn)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    dls = DataLoaders(TensorLoader((x, y), 4), TensorLoader((x, y), 8))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    learn = Learner(model, dls, F.cross_entropy, cbs=[MixedPrecision(), GradAccumCB(8),
                                                      GradClipCB(1.0), Spy(0.4)])
    learn.fit(1)
    assert calls and all(dt == torch.bfloat16 for dt in calls)  # MixUp's loss, under autocast
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_augmentations_shapes_and_effects():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    flipped = random_flip(p=1.0)(x)
    assert torch.equal(flipped, x.flip(-1)) and torch.equal(random_flip(p=0.0)(x), x)
    crop = random_crop(padding=2)(x)
    assert crop.shape == x.shape
    zero = random_crop(padding=0)(x)
    assert torch.equal(zero, x)
    erased = random_erase(p=1.0, scale=(0.2, 0.2))(x)
    changed = (erased != x).float().mean().item()
    assert 0.05 < changed < 0.5
    both = compose(random_flip(1.0), random_flip(1.0))(x)
    assert torch.equal(both, x)
    torch.manual_seed(1)
    a = random_crop(2)(x)
    torch.manual_seed(1)
    assert torch.equal(a, random_crop(2)(x))  # torch's RNG: reproducible


@pytest.mark.parametrize("mixer", [MixUp(0.4), CutMix(1.0)])
def test_mixers_change_training_batches_only(mixer):
    seen = []

    class Look(Callback):
        order = 50

        def after_loss(self, learn):
            perm = None if mixer.perm is None else mixer.perm.clone()
            seen.append((learn.training, learn.batch[0].clone(), learn.preds.detach(),
                         learn.loss.item(), mixer.lam, perm))

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    dls = DataLoaders(TensorLoader((x, y), 8), TensorLoader((x, y), 8))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    Learner(model, dls, F.cross_entropy, cbs=[mixer, Look()]).fit(1)
    (training, xb, preds, loss, lam, perm), (v_training, v_xb, v_preds, v_loss, _, v_perm) = seen
    assert training and not torch.equal(xb, x) and 0 <= lam <= 1
    if isinstance(mixer, MixUp):
        assert torch.allclose(xb, lam * x + (1 - lam) * x[perm], atol=1e-6)
    else:  # CutMix: a box from the shuffled images, lam = the share of the original kept
        from_x, from_other = (xb == x), (xb == x[perm])
        assert (from_x | from_other).all()
        assert (~from_x).float().mean().item() == pytest.approx(1 - lam, abs=1 / 16 + 1e-6)
    expected = lam * F.cross_entropy(preds, y) + (1 - lam) * F.cross_entropy(preds, y[perm])
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert not v_training and torch.equal(v_xb, x) and v_perm is None
    assert v_loss == pytest.approx(F.cross_entropy(v_preds, y).item(), rel=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_scaler_steps_see_skipped_steps_and_close_abandoned_ones(fused):
    from nanofit.optim import ScalerSteps

    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    amp = ScalerSteps(scaler, opt)
    for grad, taken in ((torch.ones(3), True), (torch.full((3,), float("inf")), False),
                        (torch.ones(3), True)):
        before = p.detach().clone()
        scaler.scale((p * grad).sum()).backward()
        amp.unscale()
        assert amp.step() is taken  # fused Adam always runs its step: the scale tells
        assert torch.equal(p.detach(), before) is not taken
        opt.zero_grad()
    scaler.scale(p.sum()).backward()
    amp.unscale()  # ... then the batch is cancelled before the step
    amp.end()
    opt.zero_grad()
    scaler.scale(p.sum()).backward()
    amp.unscale()  # would raise "unscale_() has already been called" without end()
    assert amp.step()
    amp.remove()


def test_get_preds_inside_a_mixed_precision_fit_keeps_its_autocast():
    dtypes = []

    class PeekAndPredict(Callback):
        def after_predict(self, learn):
            if learn.training:
                dtypes.append(learn.preds.dtype)

        def after_batch(self, learn):
            if learn.training and learn.iter == 1:
                learn.get_preds()  # a helper fit inside the fit

    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    cbs=[MixedPrecision(), PeekAndPredict()])
    learn.fit(1)
    assert len(dtypes) == 5 and set(dtypes) == {torch.bfloat16}


def test_accumulation_leftover_step_runs_in_the_last_batch_with_its_events():
    events = []

    class Watch(Callback):
        order = 30

        def after_backward(self, learn):
            events.append(("backward", learn.iter, learn.accumulating))

        def after_step(self, learn):
            events.append(("step", learn.iter, learn.accumulating))

    # 5 batches of 8, n_acc 16: steps after batches 1 and 3, and the leftover at batch 4
    learn = Learner(make_model(), make_dls(n_train=40), F.cross_entropy,
                    cbs=[GradAccumCB(16), Watch()])
    learn.fit(1, valid=False)
    done = [i for kind, i, acc in events if kind == "backward" and not acc]
    assert done == [1, 3, 4] and len(events) == 10  # no extra event after the epoch


def test_mixed_precision_takes_the_course_n_inp():
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[MixedPrecision(n_inp=1)])
    learn.n_inp = 5
    learn.fit(1)
    assert learn.n_inp == 1
