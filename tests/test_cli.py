"""`nanofit demo` end to end, as a user runs it, in a real subprocess."""
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # real subprocesses: deselect with -m 'not slow'


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nanofit", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=240)


def test_demo_finds_an_lr_trains_to_95_percent_and_writes_the_plots(tmp_path):
    result = run("demo", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\r" not in out  # not a terminal: plain lines
    suggested = float(re.search(r"lr_find suggests (\S+) \(valley\)", out).group(1))
    assert 1e-4 < suggested < 1.0
    assert f"lr_max {suggested:.2e}" in out  # trained at the suggestion
    accuracy = float(re.search(r"validation accuracy (\d\.\d+)", out).group(1))
    assert accuracy >= 0.95
    rows = [line for line in out.splitlines() if re.match(r"^\d+\s", line)]
    assert len(rows) == 8  # the default number of epochs, one line each (none from lr_find)
    for name in ("loss.png", "lr_find.png", "schedule.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG", name


def test_demo_flags_change_the_run(tmp_path):
    result = run("demo", "--epochs", "2", "--bs", "128", "--lr", "0.1", "--seed", "3",
                 "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "after 2 epochs" in result.stdout and "lr_max 1.00e-01" in result.stdout
    assert "lr_find" not in result.stdout and not (tmp_path / "o" / "lr_find.png").exists()


def test_demo_diagnose_writes_activation_plots(tmp_path):
    result = run("demo", "--epochs", "1", "--lr", "0.05", "--diagnose", "--out", "d", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("stats.png", "color_dim.png", "dead_chart.png"):
        assert (tmp_path / "d" / name).read_bytes()[:4] == b"\x89PNG", name


@pytest.mark.parametrize("args", [["demo", "--epochs", "0"], ["demo", "--lr", "abc"],
                                  ["demo", "--nope"], ["bogus"], ["demo", "--bs", "1.5"],
                                  ["demo", "--seed", "99999999999999999999"], []])
def test_bad_flags_give_one_line(args, capsys):
    from nanofit.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err, err


def test_bad_flag_and_bad_out_folder_as_a_user_sees_them(tmp_path):
    result = run("demo", "--lr", "-1", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("nanofit demo: error: argument --lr: must be > 0, "
                                     "got '-1' (see --help)")
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("demo", "--out", str(blocker / "sub"), cwd=tmp_path)
    assert result.returncode == 2 and "cannot create --out folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_installed_console_command(tmp_path):
    import shutil

    exe = shutil.which("nanofit")
    assert exe, "the `nanofit` command is not on PATH: install the package (pip install -e .)"
    result = subprocess.run([exe, "demo", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--epochs" in result.stdout
    import nanofit

    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"nanofit {nanofit.__version__}"
