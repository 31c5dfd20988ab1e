"""Data-parallel training: 2 CPU processes (gloo, loopback) started by torchrun."""
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from nanofit import DDPCB, DataLoaders, Learner, MetricsCB, TensorLoader
from tests.helpers import make_dls, make_model

ROOT = str(Path(__file__).resolve().parents[1])


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(71, 6, generator=g)  # 64 training samples, 7 validation (uneven: 4 + 3)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x[:64], y[:64], x[64:], y[64:]


def make_learner(bs, loader, cbs=()):
    xt, yt, xv, yv = data()
    if loader == "tensor":
        dls = DataLoaders(TensorLoader((xt, yt), bs), TensorLoader((xv, yv), bs))
    else:
        dls = DataLoaders(DataLoader(TensorDataset(xt, yt), batch_size=bs),
                          DataLoader(TensorDataset(xv, yv), batch_size=bs))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return Learner(model, dls, F.cross_entropy, lr=0.1,
                   cbs=[MetricsCB(acc=MulticlassAccuracy(3, average="micro")), *cbs])


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_distributed import make_learner
    from nanofit import CheckpointCB, DDPCB, ProgressCB
    from nanofit.distributed import rank
    out, loader = sys.argv[1], sys.argv[2]
    learn = make_learner(4, loader, cbs=[DDPCB(), ProgressCB(),
                                         CheckpointCB(f"{{out}}/ckpt_rank{{rank()}}")])
    learn.fit(2)
    r = rank()
    torch.save(learn.model.state_dict(), f"{{out}}/weights_{{r}}.pt")
    with open(f"{{out}}/history_{{r}}.json", "w") as f:
        json.dump(learn.metrics.history, f)
""")


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, loader):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path), loader], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    w0 = torch.load(tmp_path / "weights_0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights_1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the ranks stayed in step
    single = make_learner(8, loader)  # global batch 2 x 4
    single.fit(2)
    ref = single.model.state_dict()
    assert all(torch.allclose(w0[k], ref[k], atol=1e-5) for k in ref)
    h0 = json.loads((tmp_path / "history_0.json").read_text())
    h1 = json.loads((tmp_path / "history_1.json").read_text())
    assert h0 == h1  # every rank reports the same, global, numbers
    for mine, theirs in zip(h0, single.metrics.history):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert mine["acc"] == pytest.approx(theirs["acc"], abs=1e-6)
    # only rank 0 printed progress and wrote checkpoints; they load without DDP
    assert result.stdout.count("valid_loss") == 1
    assert (tmp_path / "ckpt_rank0").is_dir() and not (tmp_path / "ckpt_rank1").exists()
    ckpt = sorted((tmp_path / "ckpt_rank0").glob("*.pt"))[-1]
    fresh = make_learner(8, loader)
    fresh.load(str(ckpt))
    assert all(torch.equal(fresh.model.state_dict()[k], w0[k]) for k in w0)


def test_ddpcb_does_nothing_in_a_single_process():
    from nanofit import DDPCB

    learn = make_learner(8, "tensor", cbs=[DDPCB()])
    learn.fit(1)
    assert isinstance(learn.model, nn.Sequential)


@pytest.mark.slow
def test_demo_on_two_processes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanofit", "demo", "--nproc", "2",
                             "--epochs", "2", "--lr", "0.05", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("validation accuracy") == 1  # rank 0 alone reports
    assert (tmp_path / "out" / "loss.png").exists()


def test_ddpcb_backend_is_checked_and_does_nothing_in_one_process():
    with pytest.raises(ValueError, match="backend must be None"):
        DDPCB(backend="ncl")
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[DDPCB(backend="gloo")])
    learn.fit(1)  # no torchrun, no process group: the same script runs in one process
    assert not isinstance(learn.model, torch.nn.parallel.DistributedDataParallel)


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    import torch.nn.functional as F
    from torch import nn
    import json
    from nanofit import (CancelFitException, Callback, CheckpointCB, DDPCB, DataLoaders,
                         Learner, MetricsCB, TensorLoader)
    from nanofit.distributed import rank
    mode, out = sys.argv[1], sys.argv[2]

    class Jitter(Callback):  # a random batch augmentation, drawn from each rank's own RNG
        def before_batch(self, learn):
            if learn.training:
                x, y = learn.batch
                learn.batch = (x + 0.1 * torch.randn_like(x), y)

    class StopAt(Callback):
        order = 10_000  # after CheckpointCB saved the batch, on every rank at once
        def after_batch(self, learn):
            if learn.training and learn.epoch == 1 and learn.iter == 2:
                raise CancelFitException()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long()
    dls = DataLoaders(TensorLoader((x, y), 4, shuffle=True), TensorLoader((x[:8], y[:8]), 4))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    cbs = [DDPCB(seed=1), Jitter(), MetricsCB(),
           CheckpointCB(out + "/ckpt", every_n_batches=1)]
    learn = Learner(model, dls, F.cross_entropy, lr=0.1, cbs=cbs,
                    opt_func=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
    torch.manual_seed(100 + rank())  # per-rank seeds: each rank's dropout and jitter differ
    if mode == "stop":
        learn.fit(3, cbs=[StopAt()])
    else:
        learn.fit(3, resume=out + "/ckpt" if mode == "resume" else None)
    if rank() == 0 and mode != "stop":
        torch.save(learn.model.state_dict(), out + "/weights.pt")
        torch.save(learn.opt.state_dict(), out + "/opt.pt")
        with open(out + "/history.json", "w") as f:
            json.dump(learn.metrics.history, f)
""")


def _torchrun(script, *args):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), *map(str, args)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_a_resumed_two_process_run_with_per_rank_randomness_is_bit_exact(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT.format(root=ROOT))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    cut.mkdir()
    _torchrun(script, "whole", whole)
    _torchrun(script, "stop", cut)
    _torchrun(script, "resume", cut)
    expected = torch.load(whole / "weights.pt", weights_only=True)
    resumed = torch.load(cut / "weights.pt", weights_only=True)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    opt_a = torch.load(whole / "opt.pt", weights_only=True)["state"]
    opt_b = torch.load(cut / "opt.pt", weights_only=True)["state"]
    assert opt_a.keys() == opt_b.keys() and all(
        torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    history = (whole / "history.json").read_text()
    assert history == (cut / "history.json").read_text()


@pytest.mark.slow
def test_an_error_on_one_rank_ends_the_job_at_once_instead_of_waiting_for_the_timeout(tmp_path):
    script = tmp_path / "boom.py"
    root = str(Path(__file__).parent.parent)
    script.write_text(f"""
import os, sys
sys.path.insert(0, {root!r})
import torch.nn.functional as F
from tests.test_distributed import make_learner
from nanofit import DDPCB

class Boom:
    order = 0
    def after_batch(self, learn):
        if learn.training and learn.step == 2 and os.environ["RANK"] == "1":
            raise ValueError("rank 1 data error")

make_learner(4, "tensor", cbs=[DDPCB(timeout_s=120), Boom()]).fit(2)
""")
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script)], capture_output=True, text=True, timeout=100)
    assert result.returncode != 0 and "rank 1 data error" in result.stderr
    # rank 0 waited in a collective: rank 1 closed its process group on the way out (no
    # barrier at exit after an error), so rank 0 failed too, long before the 120 s timeout
    assert time.monotonic() - start < 60
