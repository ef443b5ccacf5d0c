import json

import pytest

from mnv4.cli import main

from .nas_common import tiny_space


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "digits"], "exactly one target"),
        (["--data", "digits", "--target-ms", "1", "--hardware", "macs"], "--target-macs"),
        (["--data", "/no/such/folder", "--target-macs", "1"], "no such folder"),
        (["--data", "digits", "--target-like", "mnv4_foo"], "unknown model"),
        (["--data", "digits", "--target-macs", "1", "--space", "xl"], "unknown search space"),
        (["--data", "digits", "--target-macs", "1", "--hardware", "pixel9"], "--hardware"),
        (["--data", "digits", "--target-macs", "1", "--beta", "0.5"], "--beta"),
        (["--data", "digits", "--target-macs", "1", "--distill", "x"], "no such soft-label dataset folder: x"),
        # 32 px digits: the space's cheapest to dearest architectures cost about 0.43-1.3 ms on this model
        (["--data", "digits", "--hardware", "pixel6_cpu", "--target-ms", "2.4"], "out of reach: space s costs about"),
        (["--data", "digits", "--target-macs", "1"], "the target 1 MMACs is out of reach"),
        (["--resume", "/no/such/search"], "no checkpoint"),
    ],
)
def test_search_refuses_bad_options_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["search", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_show_space_prints_the_choices(capsys):
    assert main(["search", "--show-space", "--space", "m_hybrid"]) == 0
    out = capsys.readouterr().out
    assert "stage /16" in out and "MQA slots m4k64s2" in out


@pytest.mark.slow
def test_search_resume_then_profile_and_train_the_spec(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_space().to_dict()))
    common = ["--no-progress"]
    argv = ["search", "--data", "digits", "--space", "tiny.json", "--target-macs", "0.15", "--input-size", "16"]
    argv += ["--epochs", "1", "-b", "64", "--eval-subnets", "1", "-o", "s", "--cost-tolerance", "1e-9", *common]
    assert main([*argv, "--max-steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "stopped at step 8 of" in out and "(max_steps)" in out and "mnv4 search --resume s" in out
    # a setting a resume may not change is refused by name, not dropped; a new search there needs --exist-ok
    assert main(["search", "--resume", "s", "--lr", "0.5", "--target-macs", "0.2", *common]) == 2
    assert "--lr, --target-macs cannot change" in capsys.readouterr().err
    assert main(["search", "--resume", "s", "-o", "other", *common]) == 2
    assert "--output 'other' is not the run being resumed" in capsys.readouterr().err
    assert main([*argv, "--max-steps", "1"]) == 2
    assert "or replace it with --exist-ok" in capsys.readouterr().err
    # resumed through another spelling of the folder, with a setting a resume may change
    code = main(["search", "--resume", str(tmp_path / "s"), "--workers", "1", *common])
    out, err = capsys.readouterr()
    # a tolerance no architecture meets: one error line naming where the result is, and no "next:" hint
    # (Python's os.fork() warning appears when another test of this process imported JAX: not ours)
    err = "\n".join(line for line in err.strip().splitlines() if "os.fork()" not in line)
    assert code == 3 and "next:" not in out + err and len(err.splitlines()) == 1
    assert err.startswith("mnv4: error: the architecture found costs") and str(tmp_path / "s") in err
    assert main(["profile", "--spec", "s/spec.json", "--input-size", "16"]) == 0
    assert "GMACs" in capsys.readouterr().out
    assert main(["profile", "--spec", "s/spec.json", "-m", "mnv4_conv_small"]) == 2
    assert main(["train", "--spec", "s/spec.json", "--data", "digits", "--epochs", "0.2", "-o", "t", *common]) == 0
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["model"].startswith("nas_tiny_macs")
