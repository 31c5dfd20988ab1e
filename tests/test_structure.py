"""The package's structure as users meet it: a light import, where names live, named callback
orders, which callbacks sit out the learner's helper fits, shared state, and the small helpers
the layers share (rebuild_loader, eval_mode, the export registry, wrap_handler)."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

import nanofit
from nanofit import Callback, DataLoaders, Learner, MetricsCB, Order, ProgressCB, TensorLoader
from nanofit.callbacks import (
    DDPCB,
    BatchTransformCB,
    CheckpointCB,
    CompileCB,
    DeviceCB,
    GradAccumCB,
    GradClipCB,
    MixedPrecision,
    ProfileCB,
    Recorder,
)
from nanofit.data import rebuild_loader
from nanofit.registry import exportable, resolve
from nanofit.torch_utils import eval_mode
from tests.helpers import make_dls, make_model


def test_import_nanofit_loads_no_plotting_or_notebook_library():
    code = ("import sys, nanofit, nanofit.callbacks, nanofit.vision; "
            "print(sorted(m for m in ('matplotlib', 'PIL', 'IPython', 'tensorboard', "
            "'transformers', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_every_name_has_a_home_and_the_top_level_keeps_old_imports():
    from nanofit import callbacks, schedule, vision

    for name in nanofit.__all__:
        assert hasattr(nanofit, name), name
    for name in callbacks.__all__ + vision.__all__ + schedule.__all__:
        assert getattr(callbacks, name, None) or getattr(vision, name, None) \
            or getattr(schedule, name, None), name
    # names importable from the top before the re-layering still are
    for old in ("simple_cnn", "sched_cos", "lsuv_init", "HooksCallback", "ActivationStats",
                "show_images", "ImageFolder", "HPOptimizer", "rank0_only", "collate_dict"):
        assert hasattr(nanofit, old), old
    # one naming convention for callbacks, the course's names kept
    assert callbacks.RecorderCB is callbacks.Recorder
    assert callbacks.MixedPrecisionCB is callbacks.MixedPrecision
    assert callbacks.HooksCB is callbacks.HooksCallback
    assert vision.Normalize is nanofit.Normalize
    assert isinstance(nanofit.__version__, str) and nanofit.__version__


def test_shipped_callbacks_run_in_the_documented_order():
    # Each pair is a dependency: the first must run before the second in every event.
    before = [(DDPCB(), CompileCB()), (CompileCB(), DeviceCB()),
              (DeviceCB(), BatchTransformCB(lambda x: x)), (MixedPrecision(), GradAccumCB(8)),
              (GradAccumCB(8), GradClipCB(1.0)), (MetricsCB(), Recorder()),
              (Recorder(), ProgressCB()), (ProgressCB(), CheckpointCB("unused")),
              (ProfileCB(), DDPCB())]
    for a, b in before:
        assert a.order < b.order, (type(a).__name__, a.order, type(b).__name__, b.order)
    assert MetricsCB.order == Order.METRICS and CheckpointCB.order == Order.CHECKPOINT


def test_show_training_loop_names_each_callbacks_order(capsys):
    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    cbs=[ProgressCB(), DeviceCB("cpu"), MetricsCB()])
    learn.show_training_loop()
    rows = capsys.readouterr().out.split("before_fit")[0].splitlines()[1:]
    assert [r.split()[-1] for r in rows] == ["DeviceCB", "MetricsCB", "ProgressCB"]
    assert "DEVICE" in rows[0] and "METRICS" in rows[1] and "PROGRESS" in rows[2]


class Seen(Callback):
    """Counts the fits it took part in."""

    def __init__(self, main_fit_only=False, **flags):
        self.main_fit_only = main_fit_only
        for k, v in flags.items():
            setattr(self, k, v)
        self.fits = 0

    def before_fit(self, learn):
        self.fits += 1


def test_main_fit_only_callbacks_sit_out_lr_find_and_inference():
    plain, main, main_but_lr = Seen(), Seen(main_fit_only=True), Seen(True, run_in_lr_find=True)
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[plain, main, main_but_lr])
    learn.lr_find(num_it=5, plot=False)
    learn.get_preds()
    assert (plain.fits, main.fits, main_but_lr.fits) == (2, 0, 1)
    learn.fit(1)
    assert (plain.fits, main.fits, main_but_lr.fits) == (3, 1, 2)
    assert learn.cbs == [plain, main, main_but_lr]  # all back, in their order


def test_shared_state_is_never_stale_and_survives_helper_fits():
    seen = []

    class Look(Callback):
        order = Order.PROGRESS

        def after_epoch(self, learn):
            seen.append(learn.metrics)

    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[Look()])
    metrics = MetricsCB()
    learn.fit(1, cbs=[metrics])
    assert seen == [metrics, metrics] and learn.metrics is metrics  # readable after the fit
    learn.get_preds()
    learn.lr_find(num_it=5, plot=False)
    assert learn.metrics is metrics  # helper fits leave what the user's fit shared
    seen.clear()
    learn.fit(1)  # this fit has no MetricsCB: nobody may read the old one during it
    assert seen == [None, None] and learn.metrics is None


def test_rebuild_loader_keeps_every_setting_but_the_changes():
    ds = TensorDataset(torch.arange(20.0), torch.arange(20))
    gen = torch.Generator().manual_seed(3)
    collate = lambda b: b  # noqa: E731
    dl = DataLoader(ds, batch_size=4, shuffle=True, generator=gen, drop_last=True,
                    collate_fn=collate, num_workers=1, persistent_workers=True, timeout=5)
    new = rebuild_loader(dl, sampler=SequentialSampler(ds))
    assert isinstance(new.sampler, SequentialSampler) and new.dataset is ds
    assert (new.batch_size, new.drop_last, new.num_workers, new.persistent_workers,
            new.timeout, new.generator, new.collate_fn) == (4, True, 1, True, 5, gen, collate)
    same = rebuild_loader(DataLoader(ds, batch_size=5, shuffle=True))
    assert isinstance(same.sampler, RandomSampler) and len(same) == 4
    batches = [[0, 1], [2, 3, 4]]
    custom = rebuild_loader(DataLoader(ds), batch_sampler=batches)
    assert [len(b[0]) for b in custom] == [2, 3]


def test_eval_mode_gives_every_module_its_own_mode_back_even_after_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
    model[1].eval()  # a mix of modes, as after freezing part of a model
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True]


@exportable
def tiny_net(n_out: int = 2) -> nn.Module:
    return nn.Linear(3, n_out)


@exportable
class TinyNet(nn.Linear):
    def __init__(self):
        super().__init__(3, 2)


class NotRegistered(TinyNet):
    pass


def test_the_export_registry_matches_exact_names_only():
    assert resolve(f"{__name__}:tiny_net") is tiny_net
    assert resolve(f"{__name__}:TinyNet") is TinyNet
    assert tiny_net(4).nanofit_constructor == (f"{__name__}:tiny_net", [4], {})
    for bad in (f"{__name__}:NotRegistered", f"{__name__}:tiny_net.__globals__",
                f"{__name__}:TinyNet.__init__", "builtins:eval", 42):
        with pytest.raises(ValueError, match="refusing to call it|must be a name"):
            resolve(bad)
    assert resolve(f"{__name__}:NotRegistered", allowed=(NotRegistered,)) is NotRegistered


def test_wrap_handler_wraps_every_handler_and_errors_still_name_their_callback():
    calls = []

    class Tracer(Callback):
        def wrap_handler(self, event, fn):
            def traced(learn):
                calls.append(event)
                fn(learn)
            traced.__wrapped__ = fn
            return traced

    class Broken(Callback):
        def after_loss(self, learn):
            raise ValueError("bad")

    learn = Learner(make_model(), make_dls(n_train=8, n_valid=8), F.cross_entropy,
                    cbs=[Tracer(), MetricsCB()])
    learn.fit(1)
    assert calls.count("predict") == 2 and calls.count("step") == 1  # one batch per phase
    assert calls[0] == "before_fit" and calls.count("after_epoch") == 2
    learn.add_cb(Broken())
    with pytest.raises(ValueError) as info:
        learn.fit(1)
    assert "raised in Broken.after_loss (event 'after_loss')" in info.value.__notes__


def test_loop_position_is_the_learners_and_resumes_mid_epoch(tmp_path):
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    dls = DataLoaders(TensorLoader((x, y), 8, shuffle=True,
                                   generator=torch.Generator().manual_seed(0)))

    class Stop(Callback):
        def after_batch(self, learn):
            if learn.iter == 1:
                learn.save(str(tmp_path / "mid.pt"))
                raise nanofit.CancelFitException()

    learn = Learner(make_model(), dls, F.cross_entropy, cbs=[Stop()])
    learn.fit(1, valid=False)
    assert not learn.position.fitting
    resumed = Learner(make_model(), dls, F.cross_entropy)
    order = []

    class Watch(Callback):
        def after_batch(self, learn):
            order.append(learn.iter)

    resumed.fit(1, valid=False, cbs=[Watch()], resume=str(tmp_path / "mid.pt"))
    assert order == [2, 3]  # the rest of the interrupted epoch only
