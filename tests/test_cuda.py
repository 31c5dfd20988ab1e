"""CUDA checks: fp16 with a GradScaler, accumulation and clipping, pinned memory, data resident
on the GPU, no per-batch host sync, nccl under torchrun, and resuming with a scaler.

Skipped without a GPU. On one: `python -m pytest -q -m cuda -rA tests/test_cuda.py`, or
`bash bench/gpu_check.sh` (these tests, then the GPU overhead benchmark). Every test prints
what it measured, so a failure says what went wrong, and a pass shows the numbers.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import nanofit
from nanofit import (
    Callback,
    CancelBatchException,
    CancelFitException,
    CheckpointCB,
    DataLoaders,
    DeviceCB,
    GradAccumCB,
    GradClipCB,
    Learner,
    MetricsCB,
    MixedPrecision,
    ProgressCB,
    Recorder,
)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
PKG_DIR = str(Path(nanofit.__file__).resolve().parent)
N_IN, N_OUT = 16, 2


# ---- tiny data and model -------------------------------------------------------------------------
def make_xy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linearly separable 2-class problem (the same hyperplane for every seed)."""
    w = torch.randn(N_IN, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, N_IN, generator=torch.Generator().manual_seed(seed))
    return x, (x @ w > 0).long()


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_IN, 32), nn.ReLU(), nn.Linear(32, N_OUT))


def tensor_dls(n_train: int = 512, n_valid: int = 128, bs: int = 32, shuffle: bool = True,
               device: str | None = None) -> DataLoaders:
    xt, yt = make_xy(n_train, 0)
    xv, yv = make_xy(n_valid, 1)
    return DataLoaders.from_tensors((xt, yt), (xv, yv), batch_size=bs, shuffle=shuffle,
                                    generator=torch.Generator().manual_seed(0), device=device)


def initial_valid_loss(model: nn.Module, n_valid: int = 128) -> float:
    xv, yv = make_xy(n_valid, 1)
    with torch.no_grad():
        return F.cross_entropy(model.cpu()(xv), yv).item()


def valid_losses(learn: Learner) -> list[float]:
    return [r["loss"] for r in learn.metrics.history if r["train"] == "eval"]


def cpu_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def grad_norm(model: nn.Module) -> torch.Tensor:
    """Total 2-norm of the gradients, on the device (no sync)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm()


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """No TF32: CPU and GPU float32 results must agree to ~1e-5."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


# ---- callbacks the tests use ---------------------------------------------------------------------
def train_index(learn: Learner) -> int:
    """The index of the current training batch over the whole fit (also in a resumed fit);
    call it during a training phase only (`n_iter` is then the training loader's length)."""
    return learn.epoch * learn.n_iter + learn.iter


class OverflowAt(Callback):
    """Multiplies the loss of training batch `at` by 1e30: its fp16 gradients overflow to inf."""

    order = 1

    def __init__(self, at: int) -> None:
        self.at = at

    def after_loss(self, learn):
        if learn.training and train_index(learn) == self.at:
            learn.loss = learn.loss * 1e30


class StepCounter(Callback):
    """Counts the optimizer steps that really ran (torch's step hooks: a step the GradScaler
    skips never calls optimizer.step), and keeps the gradient norm each real step applied."""

    order = 30

    def __init__(self) -> None:
        self.steps = 0
        self.applied_norms: list[torch.Tensor] = []
        self._handles = []

    def before_fit(self, learn):
        opt, model = learn.opt.opt, learn.model
        self._handles = [
            opt.register_step_pre_hook(lambda o, a, k: self.applied_norms.append(grad_norm(model))),
            opt.register_step_post_hook(lambda o, a, k: self._count()),
        ]

    def _count(self):
        self.steps += 1

    def cleanup_fit(self, learn):
        for h in self._handles:
            h.remove()


class StopAfter(Callback):
    """Stops the fit right after training batch `at` (over the whole fit), after CheckpointCB."""

    order = 10_000

    def __init__(self, at: int) -> None:
        self.at = at

    def after_batch(self, learn):
        if learn.training and train_index(learn) == self.at:
            raise CancelFitException()


# ---- counting host-device synchronisations -------------------------------------------------------
@contextlib.contextmanager
def watch_syncs(enable: bool = True):
    """Collects torch's "synchronizing CUDA operation" warnings (set_sync_debug_mode('warn'))
    with the Python stack of each. `enable=False`: the caller switches the mode itself."""
    records: list[traceback.StackSummary] = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            records.append(traceback.extract_stack()[:-1])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        if enable:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield records
        finally:
            torch.cuda.set_sync_debug_mode(0)


def where_syncs(records: list[traceback.StackSummary]) -> str:
    """'count  caller (innermost frame) <- nanofit frame' per place, most frequent first."""
    places = collections.Counter()
    for stack in records:
        frames = [f for f in stack if "warnings" not in Path(f.filename).name]
        inner = frames[-1] if frames else None
        ours = next((f for f in reversed(frames) if f.filename.startswith(PKG_DIR)), None)
        fmt = (lambda f: f"{Path(f.filename).name}:{f.lineno} {f.name}" if f else "?")
        code = (ours.line or "").strip()[:70] if ours else ""
        places[f"{fmt(inner)}  <-  {fmt(ours)}  [{code}]"] += 1
    return "\n".join(f"  {n:4d}  {place}" for place, n in places.most_common())


class SyncSwitch(Callback):
    """Turns sync-debug mode on (on=True) or off at before_batch: put a pair around DeviceCB
    (order -10) to watch only what DeviceCB does with each batch."""

    def __init__(self, order: int, on: bool) -> None:
        self.order, self.on = order, on

    def before_batch(self, learn):
        torch.cuda.set_sync_debug_mode("warn" if self.on else 0)


class TTYStringIO(io.StringIO):
    """A StringIO that says it is a terminal, so ProgressCB draws its tqdm bars into it."""

    def isatty(self):
        return True


# ---- a. fp16 + GradScaler ------------------------------------------------------------------------
def test_fp16_grad_scaler_trains_with_float32_params():
    seen = {}

    class Look(Callback):
        order = 30

        def after_predict(self, learn):
            seen.setdefault("preds", learn.preds.dtype)

        def after_loss(self, learn):
            seen.setdefault("loss", learn.loss.dtype)

        def after_fit(self, learn):
            seen["scaler"] = learn.grad_scaler

    model = make_model()
    before = initial_valid_loss(model)
    mp, counter = MixedPrecision(), StepCounter()
    learn = Learner(model, tensor_dls(), F.cross_entropy, lr=0.3,
                    cbs=[DeviceCB("cuda"), mp,
                         MetricsCB(acc=MulticlassAccuracy(2, average="micro")), counter, Look()])
    learn.fit(4)
    losses = valid_losses(learn)
    print(f"valid loss {before:.4f} -> {losses}; accuracy {learn.metrics.history[-1]['acc']:.3f}; "
          f"scale {mp.scaler.get_scale() if mp.scaler else None}; skipped {mp.skipped}; "
          f"real steps {counter.steps}; dtypes {seen}")
    assert mp.dtype == torch.float16, f"MixedPrecision chose {mp.dtype} on CUDA, expected float16"
    assert isinstance(mp.scaler, torch.amp.GradScaler), f"no GradScaler on CUDA fp16: {mp.scaler!r}"
    assert seen["scaler"] is mp.scaler, f"learn.grad_scaler during the fit was {seen['scaler']!r}"
    assert learn.grad_scaler is None, "learn.grad_scaler must be cleared at cleanup_fit"
    assert seen["preds"] == torch.float16, f"predictions under autocast were {seen['preds']}"
    assert seen["loss"] == torch.float32, f"cross-entropy under autocast gave {seen['loss']}"
    bad = {n: (p.dtype, p.device) for n, p in learn.model.named_parameters()
           if p.dtype != torch.float32 or p.device.type != "cuda"}
    assert not bad, f"parameters must stay float32 on cuda, got {bad}"
    assert all(torch.isfinite(p).all() for p in learn.model.parameters()), "non-finite weights"
    assert losses[-1] < 0.5 * before, \
        f"fp16 training did not learn: valid loss {before} -> {losses}"
    assert learn.metrics.history[-1]["acc"] > 0.9, f"accuracy {learn.metrics.history[-1]}"
    assert mp.skipped == 0 and counter.steps == 4 * 16, \
        f"no overflow expected on this tiny problem: skipped={mp.skipped}, steps={counter.steps}/64"


def test_fp16_overflow_skips_exactly_that_step_and_halves_the_scale():
    at = 5
    rec = {}

    class Watch(Callback):
        order = 40

        def before_batch(self, learn):
            if learn.training and train_index(learn) in (at, at + 1):
                rec[train_index(learn)] = {
                    "weights": [p.detach().clone() for p in learn.model.parameters()],
                    "scale": learn.grad_scaler.get_scale(), "steps": counter.steps}

        def after_step(self, learn):
            i = train_index(learn)
            if i in rec:
                r = rec[i]
                r["unchanged"] = all(torch.equal(w, p) for w, p in
                                     zip(r["weights"], learn.model.parameters()))
                r["scale_after"] = learn.grad_scaler.get_scale()
                r["steps_after"] = counter.steps

    model = make_model()
    before = initial_valid_loss(model)
    mp, counter = MixedPrecision(), StepCounter()
    learn = Learner(model, tensor_dls(), F.cross_entropy, lr=0.3,
                    cbs=[DeviceCB("cuda"), mp, MetricsCB(), OverflowAt(at), counter, Watch()])
    with pytest.warns(UserWarning, match=r"1 optimizer step\(s\) in epoch 0 were skipped"):
        learn.fit(3)
    summary = {i: {k: v for k, v in r.items() if k != "weights"} for i, r in rec.items()}
    print(f"per batch: {summary}; skipped {mp.skipped}; real steps {counter.steps} of 48; "
          f"valid losses {before:.4f} -> {valid_losses(learn)}")
    r = rec[at]
    assert r["unchanged"], f"batch {at} overflowed but the weights changed: {summary}"
    assert r["steps_after"] == r["steps"], f"optimizer.step ran on the overflowing batch: {summary}"
    assert r["scale_after"] == r["scale"] * 0.5, f"scale not backed off on overflow: {summary}"
    nxt = rec[at + 1]
    assert not nxt["unchanged"] and nxt["steps_after"] == nxt["steps"] + 1, \
        f"the batch after the overflow must step normally: {summary}"
    assert mp.skipped == 1, f"MixedPrecision.skipped = {mp.skipped}, expected exactly 1"
    assert counter.steps == 3 * 16 - 1, f"{counter.steps} real steps, expected 47 (48 - 1 skipped)"
    assert all(torch.isfinite(p).all() for p in learn.model.parameters()), "non-finite weights"
    assert valid_losses(learn)[-1] < 0.5 * before, f"did not train: {valid_losses(learn)}"


# ---- b. fp16 with accumulation and clipping ------------------------------------------------------
@pytest.mark.parametrize("n_acc", [None, 128], ids=["clip", "accum+clip"])
def test_fp16_clipping_sees_unscaled_grads_and_bounds_every_step(n_acc):
    max_norm = 0.1 if n_acc else 0.25
    clip, counter, mp = GradClipCB(max_norm), StepCounter(), MixedPrecision()
    pre_clip = []

    class Look(Callback):
        order = 25  # after GradClipCB (20) in after_backward

        def after_backward(self, learn):
            if not getattr(learn, "accumulating", False):
                pre_clip.append(clip.last_norm.detach().clone())

    model = make_model()
    before = initial_valid_loss(model)
    cbs = [DeviceCB("cuda"), mp, clip, counter, Look(), MetricsCB()]
    if n_acc:
        cbs.append(GradAccumCB(n_acc))
    learn = Learner(model, tensor_dls(), F.cross_entropy, lr=0.5, cbs=cbs)
    learn.fit(6)
    pre = torch.stack(pre_clip).cpu() if pre_clip else torch.zeros(0)
    applied = torch.stack(counter.applied_norms).cpu() if counter.applied_norms else torch.zeros(0)
    losses = valid_losses(learn)
    scale = mp.scaler.get_scale()
    span = (lambda t: f"{t.min().item():.5f}..{t.max().item():.5f}" if len(t) else "none")
    print(f"n_acc={n_acc} max_norm={max_norm}: real steps {counter.steps}; scale {scale}; "
          f"pre-clip norms {span(pre)}; applied norms {span(applied)}; "
          f"valid loss {before:.4f} -> {losses}")
    expected_steps = 6 * (512 // n_acc if n_acc else 16)
    assert counter.steps == expected_steps and mp.skipped == 0, \
        f"{counter.steps} real steps (expected {expected_steps}), skipped {mp.skipped}"
    assert len(pre) == expected_steps, f"GradClipCB ran {len(pre)} times for {expected_steps} steps"
    assert torch.isfinite(pre).all(), f"non-finite pre-clip norms: {pre}"
    # Scaled gradients would be ~`scale` times larger than the true ones (norms of ~0.1-1 here).
    assert scale >= 1024 and pre.max() < 100, \
        f"GradClipCB saw norms up to {pre.max().item()} with scale {scale}: clipping scaled grads?"
    assert (pre > max_norm).any(), \
        f"no step needed clipping (max {pre.max().item()}): test too weak"
    assert applied.max() <= max_norm * (1 + 1e-3), \
        f"a step applied gradients of norm {applied.max().item()} > max_norm {max_norm}: {applied}"
    assert all(torch.isfinite(p).all() for p in learn.model.parameters()), "non-finite weights"
    assert all(v == v for v in losses) and losses[-1] < 0.8 * before, \
        f"did not train (or NaN): valid loss {before} -> {losses}"


def test_fp16_accumulation_leftover_step_is_clipped_too():
    """480 samples, n_acc=128: 3 full steps and a leftover step of 96 samples per epoch. README:
    GradClipCB clips 'the summed gradient at the step' -- the leftover step is a step too."""
    max_norm = 0.05
    counter = StepCounter()
    learn = Learner(make_model(), tensor_dls(n_train=480), F.cross_entropy, lr=0.5,
                    cbs=[DeviceCB("cuda"), MixedPrecision(), GradAccumCB(128),
                         GradClipCB(max_norm), counter])
    learn.fit(2)
    applied = [round(n.item(), 5) for n in counter.applied_norms]
    print(f"norms applied at each real step (every 4th is a leftover step): {applied}")
    assert counter.steps == 2 * 4, \
        f"{counter.steps} real steps, expected 8 (3 full + 1 leftover per epoch)"
    assert max(applied) <= max_norm * (1 + 1e-3), \
        f"unclipped step(s): norms {applied} > max_norm {max_norm} (the epoch's leftover step " \
        "runs in GradAccumCB.after_epoch, after GradClipCB's after_backward had skipped it)"


def test_fp16_batch_cancelled_after_backward_does_not_break_the_next_one():
    """README: a batch may be cancelled after backward (its grads are dropped by zero_grad). With
    fp16 the scaler has unscaled that batch's grads; the next batch must still work."""

    class SkipBatch3(Callback):
        order = 30

        def after_backward(self, learn):
            if learn.training and learn.iter == 3:
                raise CancelBatchException()

    counter = StepCounter()
    learn = Learner(make_model(), tensor_dls(), F.cross_entropy, lr=0.3,
                    cbs=[DeviceCB("cuda"), MixedPrecision(), SkipBatch3(), counter])
    try:
        learn.fit(1)
    except RuntimeError as e:
        pytest.fail(f"the batch after a cancelled one failed: {type(e).__name__}: {e} "
                    f"(notes: {getattr(e, '__notes__', [])}); GradScaler's per-step state "
                    "(unscale_ called, no update()) was not reset when the batch was cancelled")
    assert counter.steps == 15, f"{counter.steps} real steps, expected 15 (16 - 1 cancelled)"
    assert all(torch.isfinite(p).all() for p in learn.model.parameters()), "non-finite weights"


# ---- c. pinned host memory -----------------------------------------------------------------------
def test_pinned_dataloader_non_blocking_to_cuda_matches_cpu():
    with watch_syncs() as control:
        torch.ones(1024).pin_memory().to("cuda")  # a blocking copy: must be flagged
    assert control, "sync-debug mode did not flag a blocking host->device copy; cannot check"

    def run(device):
        xt, yt = make_xy(512, 0)
        xv, yv = make_xy(128, 1)
        dls = DataLoaders(DataLoader(TensorDataset(xt, yt), batch_size=32, pin_memory=True),
                          DataLoader(TensorDataset(xv, yv), batch_size=64, pin_memory=True))
        seen = collections.Counter()

        class Before(Callback):
            order = -30

            def before_batch(self, learn):
                seen[f"in: pinned={learn.batch[0].is_pinned()} {learn.batch[0].device.type}"] += 1

        class After(Callback):
            order = 0

            def before_batch(self, learn):
                seen[f"out: {learn.batch[0].device.type} {learn.batch[1].device.type}"] += 1

        dev = DeviceCB(device)
        learn = Learner(make_model(), dls, F.cross_entropy, lr=0.1,
                        cbs=[dev, Before(), After(), SyncSwitch(-11, True), SyncSwitch(-9, False),
                             MetricsCB()])
        with watch_syncs(enable=False) as syncs:
            learn.fit(2)
        return learn, dev, seen, syncs

    gpu, dev, seen, syncs = run("cuda")
    cpu, _, _, _ = run("cpu")
    diff = max_diff(cpu_weights(gpu.model), cpu_weights(cpu.model))
    print(f"batches seen: {dict(seen)}; non_blocking={dev.non_blocking}; syncs inside "
          f"DeviceCB.before_batch: {len(syncs)}\n{where_syncs(syncs)}\n"
          f"max |w_gpu - w_cpu| = {diff:.2e}; "
          f"valid losses gpu {valid_losses(gpu)} cpu {valid_losses(cpu)}")
    n = 2 * (16 + 2)
    assert seen == {"in: pinned=True cpu": n, "out: cuda cuda": n}, f"batches: {dict(seen)}"
    assert dev.non_blocking, "DeviceCB('cuda') should copy with non_blocking=True"
    assert not syncs, \
        f"DeviceCB.before_batch synchronised {len(syncs)} times:\n{where_syncs(syncs)}"
    assert diff < 1e-4, f"GPU and CPU runs differ: max weight difference {diff}"
    assert valid_losses(gpu) == pytest.approx(valid_losses(cpu), rel=1e-4, abs=1e-5)


# ---- d. tensors resident on the GPU --------------------------------------------------------------
def test_gpu_resident_tensor_loader_trains_without_host_copies():
    dls = tensor_dls(device="cuda")
    assert dls.train.tensors[0].is_cuda and dls.valid.tensors[0].is_cuda, "from_tensors(device=)"
    same = collections.Counter()

    class Ptr(Callback):
        def __init__(self, order):
            self.order = order

        def before_batch(self, learn):
            if self.order < -10:
                self.ptrs = [t.data_ptr() for t in learn.batch]
                same["on cuda" if all(t.is_cuda for t in learn.batch) else "NOT on cuda"] += 1
            else:  # after DeviceCB: the very same memory, no copy
                ptrs = [t.data_ptr() for t in learn.batch]
                same["no copy" if ptrs == before.ptrs else "copied"] += 1

    before = Ptr(-20)
    learn = Learner(make_model(), dls, F.cross_entropy, lr=0.1,
                    cbs=[DeviceCB("cuda"), before, Ptr(-5)])
    learn.fit(1)  # warm-up: model moved, kernels loaded
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with watch_syncs() as syncs:
            learn.fit(2)
        torch.cuda.synchronize()
    names = collections.Counter(e.name for e in prof.events()
                                if e.device_type == torch.autograd.DeviceType.CUDA)
    h2d = {k: v for k, v in names.items() if "HtoD" in k}
    n_batches = 2 * (16 + 1)
    print(f"batches: {dict(same)}; CUDA activity {sum(names.values())} events; host->device "
          f"copies {h2d} for {n_batches} batches; syncs {len(syncs)}:\n{where_syncs(syncs)}")
    assert same["NOT on cuda"] == 0 and same["copied"] == 0, f"batches: {dict(same)}"
    assert sum(names.values()) > 0, f"the profiler recorded no CUDA activity: {names}"
    # Allowed: the shuffled order (drawn on the CPU) goes to the GPU once per training epoch.
    assert sum(h2d.values()) <= 2 * 2, f"host->device copies {h2d} for {n_batches} batches"
    assert len(syncs) <= 2 * 2, \
        f"{len(syncs)} host syncs for {n_batches} batches:\n{where_syncs(syncs)}"

    ref = Learner(make_model(), tensor_dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB("cuda")])
    ref.fit(3)  # the same order, data on the CPU moved by DeviceCB
    diff = max_diff(cpu_weights(learn.model), cpu_weights(ref.model))
    print(f"max |w(gpu data) - w(cpu data)| = {diff:.2e}")
    assert diff < 1e-5, f"GPU-resident data trained differently: max weight difference {diff}"


# ---- e. no host sync per batch -------------------------------------------------------------------
def _fit_counting_syncs(extra_cbs, n_train_batches=200, epochs=2, bs=32):
    dls = tensor_dls(n_train=n_train_batches * bs, n_valid=640, bs=bs)  # valid: 10 batches of 64
    out = TTYStringIO()
    learn = Learner(make_model(), dls, F.cross_entropy, lr=0.1,
                    cbs=[DeviceCB("cuda"), MetricsCB(acc=MulticlassAccuracy(2, average="micro")),
                         Recorder(), ProgressCB(file=out, refresh=1e9), *extra_cbs])
    with watch_syncs() as syncs:
        learn.fit(epochs)
    torch.cuda.synchronize()
    return learn, syncs, out.getvalue()


def test_fit_has_no_per_batch_host_sync():
    epochs, n_train = 2, 200
    learn, syncs, shown = _fit_counting_syncs([], n_train, epochs)
    n_batches = epochs * (n_train + 10)
    print(f"{len(syncs)} host syncs in a fit of {n_batches} batches ({epochs} epochs x "
          f"({n_train} train + 10 valid)); where:\n{where_syncs(syncs)}")
    print(f"history: {learn.metrics.history}; progress output {len(shown)} chars")
    assert len(learn.recorder.losses) == epochs * n_train, "Recorder lost losses"
    assert "valid_loss" in shown, f"ProgressCB wrote no table: {shown[-500:]!r}"
    assert len(syncs) < 40, (f"{len(syncs)} host syncs for {n_batches} batches (a per-batch "
                             f"sync would give >= {n_batches}):\n{where_syncs(syncs)}")


def test_fp16_adds_no_host_sync_beyond_the_grad_scalers_own():
    """GradScaler.step itself reads found_inf once per step (one sync: torch's design); anything
    more per batch is nanofit's (e.g. GradScaler.get_scale() is an .item())."""
    epochs, n_train = 1, 100
    learn, syncs, _ = _fit_counting_syncs([MixedPrecision()], n_train, epochs)
    _, base, _ = _fit_counting_syncs([], n_train, epochs)
    extra = len(syncs) - len(base)
    print(f"fp16: {len(syncs)} syncs, fp32: {len(base)}, for {n_train} training steps: "
          f"{extra / n_train:.2f} extra per step; where (fp16):\n{where_syncs(syncs)}")
    assert extra <= n_train * 1.1, (f"fp16 adds {extra / n_train:.2f} host syncs per step; "
                                    f"GradScaler.step needs 1:\n{where_syncs(syncs)}")


# ---- f. nccl under torchrun ----------------------------------------------------------------------
def make_ddp_learner(bs: int, cbs=()) -> Learner:
    """Unshuffled, so that ranks' shards together are the single-process batches."""
    return Learner(make_model(), tensor_dls(bs=bs, shuffle=False), F.cross_entropy, lr=0.1,
                   cbs=[MetricsCB(), *cbs])


DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from tests.test_cuda import make_ddp_learner
    from nanofit import DDPCB, Callback, DeviceCB

    class Look(Callback):
        order = 0
        def before_fit(self, learn):
            self.info = {{"backend": dist.get_backend() if dist.is_initialized() else None,
                          "world": dist.get_world_size() if dist.is_initialized() else 1,
                          "model": type(learn.model).__name__,
                          "device": str(next(learn.model.parameters()).device)}}

    out, bs = sys.argv[1], int(sys.argv[2])
    look = Look()
    learn = make_ddp_learner(bs, cbs=[DDPCB(), DeviceCB(), look])
    learn.fit(2)
    rank = dist.get_rank() if dist.is_initialized() else 0
    loss = learn.metrics.history[-1]["loss"]
    print(f"rank {{rank}}: VALID_LOSS {{loss!r}} {{look.info}}", flush=True)
    if rank == 0:
        weights = {{k: v.detach().cpu() for k, v in learn.model.state_dict().items()}}
        torch.save(weights, out + "/weights.pt")
        with open(out + "/result.json", "w") as f:
            json.dump({{"loss": loss, **look.info}}, f)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(tmp_path: Path, nproc: int, bs: int) -> tuple[dict, dict]:
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT.format())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    pkg_root = str(Path(nanofit.__file__).resolve().parents[1])  # src/ (or wherever installed)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(tmp_path), str(bs)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 120 s; stdout: {str(e.stdout)[-2000:]} "
                    f"stderr: {str(e.stderr)[-3000:]}")
    print(f"torchrun rc={result.returncode}\nstdout: {result.stdout[-2000:]}")
    assert result.returncode == 0, \
        f"torchrun failed (rc {result.returncode}):\n{result.stderr[-4000:]}"
    info = json.loads((tmp_path / "result.json").read_text())
    return info, torch.load(tmp_path / "weights.pt", weights_only=True)


def _compare_with_single_process(info, weights, bs):
    single = make_ddp_learner(bs, cbs=[DeviceCB("cuda")])
    single.fit(2)
    ref_loss = single.metrics.history[-1]["loss"]
    diff = max_diff(weights, cpu_weights(single.model))
    print(f"torchrun: {info}; single process: valid loss {ref_loss!r}; max weight diff {diff:.2e}")
    assert info["backend"] == "nccl", \
        f"DDPCB initialised backend {info['backend']!r}, expected nccl"
    assert info["device"].startswith("cuda"), f"the model trained on {info['device']}"
    assert abs(info["loss"] - ref_loss) <= 1e-4, \
        f"valid loss under torchrun {info['loss']!r} vs single process {ref_loss!r}"
    assert diff <= 1e-4, f"weights differ from the single-process run by {diff}"


@pytest.mark.slow
def test_torchrun_one_gpu_nccl_matches_single_process(tmp_path):
    info, weights = run_torchrun(tmp_path, 1, 32)
    if info["model"] != "DistributedDataParallel":
        print("note: with one process DDPCB does not wrap the model (documented: 'with one "
              "process it does nothing'); only nccl's initialisation and teardown ran")
    _compare_with_single_process(info, weights, 32)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_two_gpus_nccl_ddp_matches_single_process(tmp_path):
    info, weights = run_torchrun(tmp_path, 2, 16)  # global batch 2 x 16
    assert info["model"] == "DistributedDataParallel" and info["world"] == 2, f"{info}"
    _compare_with_single_process(info, weights, 32)


FSDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from tests.test_cuda import make_ddp_learner
    from nanofit import CheckpointCB, DeviceCB, FSDPCB

    out, bs = sys.argv[1], int(sys.argv[2])
    learn = make_ddp_learner(bs, cbs=[FSDPCB(), DeviceCB(), CheckpointCB(out + "/ckpts")])
    learn.fit(2)
    w = learn.model[0].weight
    info = {"backend": dist.get_backend(), "world": dist.get_world_size(),
            "param": type(w).__name__, "device": str(w.device),
            "local_rows": w.to_local().shape[0], "loss": learn.metrics.history[-1]["loss"]}
    weights = {k: v.full_tensor().cpu() for k, v in learn.model.state_dict().items()}
    # bf16 parameters and fp32 gradient reduction: FSDP's MixedPrecisionPolicy
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mixed = make_ddp_learner(bs, cbs=[FSDPCB(mp_policy=policy), DeviceCB()])
    mixed.fit(1)
    info["bf16_loss"] = mixed.metrics.history[-1]["loss"]
    if dist.get_rank() == 0:
        torch.save(weights, out + "/weights.pt")
        with open(out + "/result.json", "w") as f:
            json.dump(info, f)
""")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_fsdp_on_gpus_matches_single_process_and_its_checkpoint_loads_on_cpu(
        tmp_path, nproc):
    """FSDP2 with nccl: on one GPU a world of 1 (FSDPCB shards whenever a process group
    runs: DTensor parameters, DCP checkpoint folders), on two GPUs a real split."""
    if nproc > torch.cuda.device_count():
        pytest.skip(f"needs {nproc} GPUs")
    script = tmp_path / "train_fsdp.py"
    script.write_text(FSDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    pkg_root = str(Path(nanofit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, str(ROOT), env.get("PYTHONPATH", "")])
    bs = 32 // nproc  # the same global batch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(tmp_path), str(bs)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 180 s; stderr: {str(e.stderr)[-3000:]}")
    assert result.returncode == 0, f"torchrun failed:\n{result.stderr[-4000:]}"
    info = json.loads((tmp_path / "result.json").read_text())
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    single = make_ddp_learner(32, cbs=[DeviceCB("cuda")])
    single.fit(2)
    diff = max_diff(weights, cpu_weights(single.model))
    print(f"torchrun FSDP: {info}; single: {single.metrics.history[-1]['loss']!r}; "
          f"max weight diff {diff:.2e}")
    assert info["backend"] == "nccl" and info["world"] == nproc, info
    assert info["param"] == "DTensor" and info["device"].startswith("cuda"), info
    assert info["local_rows"] == 32 // nproc, info  # Linear(16, 32): rows split over ranks
    assert diff <= 1e-4, f"weights differ from the single-process run by {diff}"
    assert abs(info["loss"] - single.metrics.history[-1]["loss"]) <= 1e-4
    assert abs(info["bf16_loss"] - valid_losses(single)[0]) < 0.1, info  # after 1 epoch
    # the sharded checkpoint (a DCP folder written on the GPU) loads here, on the CPU
    folder = nanofit.checkpoint.newest_checkpoint(tmp_path / "ckpts")
    assert folder.is_dir(), folder
    cpu = make_ddp_learner(32)
    cpu.load(str(tmp_path / "ckpts"))
    assert max_diff(weights, cpu_weights(cpu.model)) == 0
    nanofit.consolidate(tmp_path / "ckpts", tmp_path / "one.pt")
    again = make_ddp_learner(32)
    again.load(str(tmp_path / "one.pt"))
    assert max_diff(weights, cpu_weights(again.model)) == 0


# ---- g. checkpoint and resume with the scaler ----------------------------------------------------
def make_fp16_learner(*extra):
    """8 shuffled batches per epoch; batch 2 overflows, so the scale is 32768, not the default."""
    mp = MixedPrecision()
    learn = Learner(make_model(), tensor_dls(n_train=256), F.cross_entropy, lr=0.3,
                    cbs=[DeviceCB("cuda"), mp, MetricsCB(), OverflowAt(2), *extra])
    return learn, mp


@pytest.mark.parametrize("stop_at", [5, 12])
def test_fp16_resume_restores_the_grad_scaler(tmp_path, stop_at):
    warnings.simplefilter("ignore", UserWarning)  # the overflow's "step(s) skipped" warning
    ref, ref_mp = make_fp16_learner()
    ref.fit(3)

    saver = CheckpointCB(tmp_path / "ckpt", every_n_batches=1, every_epoch=False, keep=1)
    first, first_mp = make_fp16_learner()
    first.fit(3, cbs=[saver, StopAfter(stop_at)])
    scale_at_stop = first_mp.scaler.state_dict()
    saved = torch.load(saver.saved[-1], weights_only=True)
    in_file = [s["scaler"] for s in saved.get("callbacks", {}).values()
               if isinstance(s, dict) and "scaler" in s]

    resumed, resumed_mp = make_fp16_learner()
    resumed.fit(3, resume=str(saver.saved[-1]))
    diff = max_diff(cpu_weights(resumed.model), cpu_weights(ref.model))
    exact = all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                   ref.model.state_dict().values()))
    print(f"stop after batch {stop_at}: scaler at the stop {scale_at_stop}, in the file {in_file}; "
          f"final scaler resumed {resumed_mp.scaler.state_dict()} vs uninterrupted "
          f"{ref_mp.scaler.state_dict()}; skipped {resumed_mp.skipped} vs {ref_mp.skipped}; "
          f"max weight diff {diff:.2e} (bit-exact: {exact})")
    assert scale_at_stop["scale"] == 32768.0, \
        f"the overflow at batch 2 should halve the scale: {scale_at_stop}"
    assert in_file == [scale_at_stop], \
        f"checkpoint holds scaler state {in_file}, expected {scale_at_stop}"
    assert resumed_mp.scaler.state_dict() == ref_mp.scaler.state_dict(), \
        f"scaler after resume {resumed_mp.scaler.state_dict()} != {ref_mp.scaler.state_dict()}"
    assert resumed_mp.skipped == ref_mp.skipped == 1, \
        f"skipped {resumed_mp.skipped} vs {ref_mp.skipped}"
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run's by {diff}"
    assert valid_losses(resumed) == pytest.approx(valid_losses(ref), abs=1e-6)


def test_fp16_assert_resumable():
    from nanofit.testing import assert_resumable

    warnings.simplefilter("ignore", UserWarning)
    assert_resumable(lambda: make_fp16_learner()[0], 2, stop_at=[0, 3, 9])


# ---- bf16 on CUDA: steps with non-finite gradients skipped, with no host sync per step ----------
class InfGradAt(Callback):
    """Writes inf into one gradient of training batch `at` (after backward)."""

    order = 1

    def __init__(self, at: int) -> None:
        self.at = at

    def after_backward(self, learn):
        if learn.training and train_index(learn) == self.at:
            next(learn.model.parameters()).grad.view(-1)[0] = float("inf")


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-adam"])
def test_bf16_skips_a_step_with_inf_gradients_without_syncing_per_step(fused):
    opt_func = ((lambda ps, lr: torch.optim.Adam(ps, lr=lr, fused=True)) if fused
                else torch.optim.SGD)
    weights = []

    class Snapshot(Callback):
        order = 40

        def after_step(self, learn):
            if learn.training:
                weights.append([p.detach().clone() for p in learn.model.parameters()])

    mp = MixedPrecision(dtype=torch.bfloat16)
    learn = Learner(make_model(), tensor_dls(), F.cross_entropy, lr=0.05, opt_func=opt_func,
                    cbs=[DeviceCB("cuda"), mp, InfGradAt(5), Snapshot()])
    with watch_syncs() as syncs, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fit(1)
    torch.cuda.synchronize()
    same = [all(torch.equal(a, b) for a, b in zip(weights[i - 1], weights[i]))
            for i in range(1, len(weights))]
    unchanged = [i + 1 for i, s in enumerate(same) if s]
    print(f"fused={fused}: skipped {mp.skipped}; unchanged steps {unchanged}; "
          f"{len(syncs)} syncs for 16 steps:\n{where_syncs(syncs)}")
    assert mp.skipped == 1, f"skipped {mp.skipped}, expected 1"
    assert unchanged == [5], f"only step 5 may leave the weights as they were: {unchanged}"
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert len(syncs) < 16, f"{len(syncs)} host syncs: the bf16 check must not sync per step"
