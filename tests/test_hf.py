"""Dict batches and Hugging Face models: model(**batch), the model's own loss, MetricsCB on
logits and labels; a transformers GPT-2 (random weights, built from a config: no download)
trained by steps on a Hugging Face streaming dataset, resumed bit-exactly mid-stream."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from nanofit import DataLoaders, Learner, MetricsCB, Recorder
from nanofit.testing import assert_resumable

VOCAB, SEQ = 32, 16


def _tokens(seed, n):
    """n sequences that count up from a random start (mod VOCAB): learnable by a tiny model."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        start = int(torch.randint(0, VOCAB, (), generator=g))
        ids = [(start + i) % VOCAB for i in range(SEQ)]
        yield {"input_ids": ids, "labels": ids}


def _hf_dls(n_train=400):
    from datasets import IterableDataset

    train = IterableDataset.from_generator(_tokens, gen_kwargs={"seed": 0, "n": n_train})
    valid = IterableDataset.from_generator(_tokens, gen_kwargs={"seed": 1, "n": 16})
    return DataLoaders(DataLoader(train.with_format("torch"), batch_size=8),
                       DataLoader(valid.with_format("torch"), batch_size=8))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def _learner():
    torch.manual_seed(0)
    return Learner(_gpt2(), _hf_dls(), loss_func=None, lr=3e-3, opt_func=torch.optim.AdamW,
                   cbs=[MetricsCB(), Recorder()])


def test_a_transformers_model_trains_by_steps_on_a_streaming_dataset_with_its_own_loss():
    learn = _learner()
    learn.fit_one_cycle(steps=40, valid_every=20, lr_max=3e-3)
    losses = learn.recorder.losses
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # it learns
    valid = [r["loss"] for r in learn.metrics.history if r["train"] == "eval"]
    assert valid[1] < valid[0]


def test_a_run_stopped_mid_stream_resumes_bit_exactly_through_the_datasets_own_position():
    assert_resumable(_learner, None, [10], steps=16, valid_every=8)  # mid-stream, round 2


class KwargsModel(nn.Module):
    """A model called with keyword arguments that returns a dict with logits (and a loss when
    given labels), as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x, labels=None, **other_fields):
        logits = self.lin(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def _dict_dls(key="labels"):
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(3, generator=g), key: torch.randint(0, 4, (), generator=g)}
            for _ in range(32)]
    return DataLoaders(DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))


def test_dict_batches_go_in_as_keyword_arguments_and_metrics_read_logits_and_labels():
    from torchmetrics.classification import MulticlassAccuracy

    acc = MulticlassAccuracy(num_classes=4, average="micro")
    learn = Learner(KwargsModel(), _dict_dls(), loss_func=None, cbs=[MetricsCB(acc=acc)])
    learn.fit(steps=8, valid_every=4)
    record = learn.metrics.history[-1]
    model = learn.model.eval()
    batch = next(iter(learn.dls.valid))
    xs = torch.cat([b["x"] for b in learn.dls.valid])
    ys = torch.cat([b["labels"] for b in learn.dls.valid])
    with torch.no_grad():
        logits = model(x=xs)["logits"]
    assert record["acc"] == pytest.approx((logits.argmax(1) == ys).float().mean().item())
    assert record["loss"] == pytest.approx(F.cross_entropy(logits, ys).item(), rel=1e-5)
    preds, targs = learn.get_preds()
    assert torch.equal(targs, ys) and preds.shape == (32, 4)
    assert set(batch) == {"x", "labels"}


def test_dict_batches_with_a_loss_func_and_targets_named_otherwise():
    from torchmetrics.classification import MulticlassAccuracy

    learn = Learner(KwargsModel(), _dict_dls(), loss_func=lambda out, y: F.cross_entropy(
        out["logits"], y), cbs=[MetricsCB(MulticlassAccuracy(num_classes=4))])
    learn.fit(steps=4)
    assert "MulticlassAccuracy" in learn.metrics.history[-1]
    other = Learner(KwargsModel(), _dict_dls("y"), loss_func=F.cross_entropy,
                    cbs=[MetricsCB(target="y")])
    with pytest.raises(KeyError) as info:
        other.fit(steps=2)
    assert "a dict batch's targets are batch['labels'], and it has ['x', 'y']" in \
        "\n".join(info.value.__notes__)


def test_the_models_own_loss_is_used_only_when_asked_and_a_missing_one_is_explained():
    learn = Learner(KwargsModel(), _dict_dls(), cbs=[MetricsCB()])  # default loss_func: mse
    with pytest.raises(Exception) as info:
        learn.fit(steps=1)
    assert "pass Learner(..., loss_func=None)" in "\n".join(info.value.__notes__)
    no_labels = [{"x": torch.randn(3)} for _ in range(8)]
    bare = Learner(KwargsModel(), DataLoaders(DataLoader(no_labels, batch_size=4), None),
                   loss_func=None)
    with pytest.raises(ValueError, match="loss must come from the model's output"):
        bare.fit(steps=1, valid=False)


def test_gradient_accumulation_counts_the_samples_of_dict_batches():
    from nanofit import GradAccumCB

    torch.manual_seed(0)
    acc = Learner(KwargsModel(), _dict_dls(), loss_func=None, cbs=[GradAccumCB(16)])
    acc.fit(steps=4, valid=False)  # 8 samples a batch: a step every 2 batches
    torch.manual_seed(0)
    data = _dict_dls().train
    big = Learner(KwargsModel(), DataLoaders(DataLoader(data.dataset, batch_size=16), None),
                  loss_func=None)
    big.fit(steps=2, valid=False)
    for a, b in zip(acc.model.parameters(), big.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
