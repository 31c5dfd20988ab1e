"""`nanofit demo lm`: its data, baseline and model in-process; a short run, and an interrupted
run resumed, through the real command in subprocesses."""
import math
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch

from nanofit.lm_demo import (
    CharTransformer,
    CharVocab,
    CharWindows,
    generate,
    lm_dls,
    load_text,
    unigram_entropy,
)


# ---- data and baseline (fast, in-process) ----------------------------------------------------
def test_the_text_is_pythons_help_topics_and_its_unigram_baseline_is_about_3_25_nats():
    text = load_text()
    assert 400_000 < len(text) < 600_000 and "The \"assert\" statement" in text
    vocab = CharVocab(text)
    ids = vocab.encode(text)
    assert vocab.decode(ids[:50]) == text[:50] and ids.dtype == torch.long
    baseline = unigram_entropy(ids[: int(len(ids) * 0.9)], len(vocab))
    assert 3.1 < baseline < 3.4  # nats (it would be about 4.7 in bits)
    with pytest.raises(ValueError, match="'€' is not in the vocabulary"):
        CharVocab("abc").encode("a€")


def test_unigram_entropy_is_in_nats():
    assert unigram_entropy(torch.tensor([2, 2, 2]), 5) == 0.0
    assert unigram_entropy(torch.arange(8).repeat(3), 8) == pytest.approx(math.log(8))
    assert unigram_entropy(torch.tensor([0, 0, 0, 1]), 2) == \
        pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_char_windows_stream_next_characters_and_resume_from_their_state():
    ids = torch.arange(1000)
    stream = CharWindows(ids, context=16, batch_size=4, seed=1)
    assert not hasattr(stream, "__len__")  # a stream: a step fit draws what it needs
    it = iter(stream)
    first = [next(it) for _ in range(3)]
    x, y = first[0]
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    state = stream.state_dict()
    assert state["drawn"] == 3  # counted when handed out
    later = [next(it) for _ in range(2)]
    again = next(iter(stream))  # iterating again continues the stream
    restored = CharWindows(ids, context=16, batch_size=4, seed=1)
    restored.load_state_dict(state)
    resumed = iter(restored)
    for want in [*later, again]:
        assert all(torch.equal(a, b) for a, b in zip(want, next(resumed)))
    other_seed = next(iter(CharWindows(ids, context=16, batch_size=4, seed=2)))
    assert not torch.equal(other_seed[0], x)
    with pytest.raises(ValueError, match="shorter context"):
        CharWindows(torch.arange(10), context=16, batch_size=4)


def test_lm_dls_validate_on_the_held_out_end_in_consecutive_windows():
    ids = torch.arange(10_000)
    dls = lm_dls(ids, context=32, batch_size=8)
    assert dls.train.ids.max() < 9_000  # the last 10% is held out
    x, y = dls.valid.tensors
    assert x.shape == (1000 // 32, 32) and x[0, 0] == 9_000 and torch.equal(y, x + 1)
    assert len(lm_dls(ids, 32, 8, valid_windows=5).valid.tensors[0]) == 5


def test_the_model_is_causal_and_generate_is_seeded():
    torch.manual_seed(0)
    model = CharTransformer(vocab_size=10, context=12, dim=16, n_layers=1, n_heads=2).eval()
    ids = torch.randint(10, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 10
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 12, 10)
    assert torch.allclose(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])
    with pytest.raises(ValueError, match="more than its context of 12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    vocab = CharVocab("abcdefghij")
    sample = generate(model, vocab, "abc", n_chars=20, seed=3)
    assert len(sample) == 23 and sample.startswith("abc")
    assert generate(model, vocab, "abc", n_chars=20, seed=3) == sample


# ---- the command (slow: subprocesses) --------------------------------------------------------
ROUND = re.compile(r"^step (\d+)/(\d+)  train (\S+)  valid (\S+) nats/char \((\S+) x unigram "
                   r"(\S+)\)", re.M)
FINAL = re.compile(r"final validation loss (\S+) nats/char = (\S+) x unigram baseline (\S+) "
                   r"\((met|not met)")
SHORT = ["demo", "lm", "--steps", "40", "--valid-every", "20"]


def lm(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nanofit", *SHORT, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=180)


def sample_of(out):
    return out.split("sample (temperature 0.8):\n")[1].split("\nfinal validation loss")[0]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("lm")
    result = lm("--out", "run", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd, result.stdout


@pytest.mark.slow
def test_demo_lm_prints_rounds_against_the_unigram_baseline_and_saves_checkpoints(short_run):
    cwd, out = short_run
    rounds = ROUND.findall(out)
    assert [(int(s), int(n)) for s, n, *_ in rounds] == [(20, 40), (40, 40)]
    for _, _, train, valid, ratio, base in rounds:
        assert float(base) == pytest.approx(3.25, abs=0.01)  # nats per character
        assert float(ratio) == pytest.approx(float(valid) / float(base), abs=0.006)
        assert 0 < float(train) < 5
    valids = [float(r[3]) for r in rounds]
    assert valids[-1] < valids[0] < 3.25  # learning, and already past the baseline
    final = FINAL.search(out)
    assert final and float(final.group(1)) == valids[-1]
    assert final.group(4) == "not met"  # 40 steps are not enough for 0.6 x baseline
    assert sample_of(out).startswith("The ") and len(sample_of(out)) >= 200
    assert list((cwd / "run").glob("ckpt_*.pt"))


@pytest.mark.slow
def test_demo_lm_interrupted_with_ctrl_c_resumes_to_the_same_result(short_run):
    cwd, uninterrupted = short_run
    proc = subprocess.Popen([sys.executable, "-m", "nanofit", *SHORT, "--out", "cut"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(180, proc.kill)  # reading its lines must not hang the suite
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("step 20/40"):
                proc.send_signal(signal.SIGINT)  # Ctrl-C in the second round
                break
        out, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "final validation" not in out
    resumed = lm("--out", "cut", "--resume", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert ROUND.findall(resumed.stdout) == ROUND.findall(uninterrupted)[1:]
    assert FINAL.search(resumed.stdout).group(1) == FINAL.search(uninterrupted).group(1)
    assert sample_of(resumed.stdout) == sample_of(uninterrupted)  # the very same weights


@pytest.mark.parametrize("args", [["demo", "lm", "--epochs", "3"], ["demo", "--seed", "3", "lm"],
                                  ["demo", "lm", "--steps", "0"], ["demo", "lx"]])
def test_bad_lm_flags_give_one_line(args, capsys):
    from nanofit.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err, err


@pytest.mark.slow
def test_resuming_a_finished_run_loads_it_and_trains_nothing(short_run, capsys, monkeypatch):
    from nanofit.cli import main

    cwd, original = short_run
    monkeypatch.chdir(cwd)
    assert main([*SHORT, "--out", "run", "--resume"]) == 0  # a restart after the end: fine
    captured = capsys.readouterr()
    assert "the run in 'run' is complete" in captured.err
    assert not ROUND.findall(captured.out)  # no round ran again
    assert FINAL.search(captured.out).group(1) == FINAL.search(original).group(1)
    assert sample_of(captured.out) == sample_of(original)
