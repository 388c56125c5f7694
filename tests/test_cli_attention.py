"""``--attention-backend`` on ``visalign sample`` and ``visalign steer``: one flag, applied as training applies it."""

import importlib.util

import pytest

from visalign.cli import build_parser, main
from visalign.pipelines import attention
from visalign.pipelines.attention import ATTENTION_BACKENDS

SIZE = ["--steps", "2", "--height", "32", "--width", "32"]


def _sample(model, out, *extra):
    return main(["sample", model, "-p", "a red circle", *SIZE, "--out", str(out), *extra])


def _not_installed(backend: str) -> str:
    package = {"xformers": "xformers", "flash": "flash_attn", "sage": "sageattention"}[backend]
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    return package


def test_sample_and_steer_share_one_flag():
    commands = build_parser()._subparsers._group_actions[0].choices
    flags = {
        name: next(a for a in commands[name]._actions if "--attention-backend" in a.option_strings)
        for name in ("sample", "steer")
    }
    for action in flags.values():
        assert action.choices == list(ATTENTION_BACKENDS) and action.default == "native"
        assert "(default: native)" in action.help and "scaled_dot_product_attention" in action.help
        assert all(name in action.help for name in ("xformers", "flash", "sage"))
    assert flags["sample"].help == flags["steer"].help


def test_sample_with_native_runs_through_the_trainers_function(tmp_path, monkeypatch):
    applied = []
    apply = attention.apply_attention_backend

    def recording_apply(policy, name):
        applied.append(name)
        return apply(policy, name)

    monkeypatch.setattr(attention, "apply_attention_backend", recording_apply)
    assert _sample("tiny:sd3", tmp_path / "native", "--attention-backend", "native") == 0
    assert applied == ["native"]
    # native is the stock kernel: the same pixels as a run without the flag.
    assert _sample("tiny:sd3", tmp_path / "default") == 0
    grid = "grid.png"
    assert (tmp_path / "native" / grid).read_bytes() == (tmp_path / "default" / grid).read_bytes()


@pytest.mark.parametrize("backend", ["sage", "flash"])
def test_a_backend_that_is_not_installed_is_a_one_line_error(backend, tmp_path, capsys, monkeypatch):
    package = _not_installed(backend)
    monkeypatch.delenv("VISALIGN_TRACEBACK", raising=False)
    assert _sample("tiny:sd3", tmp_path / "out", "--attention-backend", backend) == 1
    err = capsys.readouterr().err
    assert err.startswith("visalign sample: error:") and package in err and f"visalign[{backend}]" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # Checked before the model loads: a missing model folder is not what is reported.
    assert _sample(str(tmp_path / "no_such_model"), tmp_path / "out", "--attention-backend", backend) == 1
    assert package in capsys.readouterr().err


def test_steer_takes_the_flag(tmp_path, capsys, monkeypatch):
    args = ["steer", "tiny:sd3", "-p", "a red circle", "--reward", "brightness", "--method", "best-of-n", "-n", "2"]
    assert main([*args, *SIZE, "--out", str(tmp_path / "ok"), "--attention-backend", "sdpa"]) == 0
    package = _not_installed("flash")
    monkeypatch.delenv("VISALIGN_TRACEBACK", raising=False)
    capsys.readouterr()
    assert main([*args, *SIZE, "--out", str(tmp_path / "err"), "--attention-backend", "flash"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("visalign steer: error:") and package in err and "Traceback" not in err


def test_a_backend_the_model_cannot_use_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    # Pretend flash-attn is installed (it is not, here): a UNet's attention cannot use it anyway.
    monkeypatch.setattr(attention, "check_attention_backend", lambda name: "flash")
    monkeypatch.delenv("VISALIGN_TRACEBACK", raising=False)
    assert _sample("tiny:sd", tmp_path / "out", "--attention-backend", "flash") == 1
    err = capsys.readouterr().err
    assert "use 'sdpa' or 'xformers'" in err and "Traceback" not in err


def test_an_unknown_backend_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "tiny:sd3", "--attention-backend", "fast"])
    assert "native" in capsys.readouterr().err
