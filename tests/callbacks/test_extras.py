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


# ---- bf16: a step whose gradients are not finite is skipped, counted and reported ----------------
class PoisonGrad(Callback):
    """Writes inf into one gradient at after_backward of training batch `at` (before clipping),
    and records whether each batch's step changed the weights (and momentum)."""

    order = 15  # after MixedPrecision and GradAccumCB, before GradClipCB (20)

    def __init__(self, at):
        self.at, self.moved, self.before = at, {}, None

    def after_backward(self, learn):
        if learn.accumulating:
            return
        self.before = [p.detach().clone() for p in learn.model.parameters()]
        self.state = {k: v.clone() for s in learn.opt.state.values() for k, v in s.items()
                      if isinstance(v, torch.Tensor)}
        if learn.iter == self.at and learn.epoch == 0:
            next(learn.model.parameters()).grad[0, 0] = float("inf")

    def after_step(self, learn):
        if learn.accumulating:
            return
        after = list(learn.model.parameters())
        assert all(torch.isfinite(p).all() for p in after), "a non-finite step reached the weights"
        state = {k: v for s in learn.opt.state.values() for k, v in s.items()
                 if isinstance(v, torch.Tensor)}
        self.moved[(learn.epoch, learn.iter)] = (
            not all(torch.equal(a, b) for a, b in zip(self.before, after)),
            not all(torch.equal(self.state[k], state[k]) for k in self.state))


def poisoned_fit(extra, opt_func=None, sync_free=None, at=2):
    mp = MixedPrecision()
    mp._sync_free = sync_free  # False: the accelerator's path (no host read per step), on CPU
    poison = PoisonGrad(at)
    opt = opt_func or (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))
    learn = Learner(make_model(), make_dls(n_train=40), F.cross_entropy, lr=0.1,
                    opt_func=opt, cbs=[mp, poison, *extra])
    with pytest.warns(UserWarning, match=r"MixedPrecision: 1 of (\d+) optimizer step\(s\) in "
                                         r"epoch 0 were skipped .*not finite") as caught:
        learn.fit(2)
    return learn, mp, poison, caught


@pytest.mark.parametrize("extra", [[], [GradClipCB(1.0)], [GradAccumCB(16), GradClipCB(1.0)]],
                         ids=["plain", "clip", "accum+clip"])
def test_bf16_skips_exactly_the_step_with_non_finite_gradients(extra):
    accumulating = bool(extra) and isinstance(extra[0], GradAccumCB)
    at = 3 if accumulating else 2  # GradAccumCB(16) steps after batches 1, 3 and 4 (of 8)
    learn, mp, poison, caught = poisoned_fit(extra, at=at)
    steps = len(poison.moved)
    assert steps == (2 * 3 if accumulating else 2 * 5)
    skipped = [k for k, (weights, momentum) in poison.moved.items() if not weights]
    assert skipped == [(0, at)]  # that step only: its weights and momentum are as they were
    assert poison.moved[(0, at)] == (False, False)
    first = min(poison.moved)  # its step creates the momentum, so nothing to compare before it
    assert all(w and (m or k == first) for k, (w, m) in poison.moved.items() if k != (0, at))
    assert mp.skipped == 1 and learn.grad_scaler is None
    per_epoch = [w for w in caught if "MixedPrecision" in str(w.message)]
    assert len(per_epoch) == 1 and f"1 of {steps // 2} optimizer" in str(per_epoch[0].message)
    assert not [w for w in caught if "fp16 overflow" in str(w.message)]  # GradAccumCB is quiet
    assert mp.state_dict()["skipped"] == 1


def test_bf16_skip_without_a_host_read_fused_is_exact_others_are_masked():
    """The accelerator's path, run on CPU: a fused optimizer gets GradScaler's found_inf and
    skips exactly; another steps with zeroed gradients (plain SGD: no change either)."""
    from functools import partial

    fused = partial(torch.optim.Adam, fused=True)
    _, mp, poison, caught = poisoned_fit([GradClipCB(1.0)], opt_func=fused, sync_free=False)
    assert poison.moved[(0, 2)] == (False, False) and mp.skipped == 1
    assert all(w for k, (w, _) in poison.moved.items() if k != (0, 2))
    assert not mp.guard and "zero gradients" not in str(caught[0].message)
    _, mp, poison, caught = poisoned_fit([], opt_func=torch.optim.SGD, sync_free=False)
    assert poison.moved[(0, 2)][0] is False and mp.skipped == 1
    assert "ran with zero gradients; fused=True skips them exactly" in str(caught[0].message)


def test_bf16_simple_cnn_on_digits_with_clipping_trains():
    """torch's CPU bf16 convolution backward sometimes returns inf/NaN gradients for 1x1
    feature maps (simple_cnn's last conv on 8x8 digits); GradClipCB then spread them to every
    parameter and the run was NaN from epoch 0, silently. Now those steps are skipped."""
    import math
    import warnings

    from nanofit.cli import digits_dls
    from nanofit.models import simple_cnn

    torch.manual_seed(1)
    mp = MixedPrecision()
    learn = Learner(simple_cnn(), digits_dls(64, 0), F.cross_entropy, lr=0.1,
                    cbs=[mp, GradClipCB(1.0), MetricsCB()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learn.fit(4)
    valid = [r["loss"] for r in learn.metrics.history if r["train"] == "eval"]
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert math.isfinite(valid[-1]) and valid[-1] < 1.8, valid
    reported = sum(int(str(w.message).split()[1]) for w in caught
                   if str(w.message).startswith("MixedPrecision:"))
    assert reported == mp.skipped  # every skipped step was reported
