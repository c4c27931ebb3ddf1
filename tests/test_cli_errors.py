"""The command line's one error mapping, without a model: user errors are one line, anything else
is reported as a camexport bug (traceback only with -v); the click choices are the library's."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

import camexport.precision
import camexport.run
import camexport.runtime
import camexport.store
from camexport.cli import main
from camexport.errors import CamexportError
from camexport.store import StoreError


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _raises(error: BaseException):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.mark.parametrize("error", [CamexportError("no such thing: pass --other"),
                                   StoreError("no such thing: pass --other")])
def test_camexport_error_is_one_line(monkeypatch, error):
    monkeypatch.setattr(camexport.store, "summary", _raises(error))
    for args in (["show", "x.h5"], ["-v", "show", "x.h5"]):
        result = invoke(*args)
        assert result.exit_code == 1
        assert result.output.strip() == "Error: no such thing: pass --other"
        assert "Traceback" not in result.output


def test_os_error_is_one_line(monkeypatch):
    monkeypatch.setattr(camexport.store, "summary",
                        _raises(PermissionError(13, "Permission denied", "x.h5")))
    result = invoke("show", "x.h5")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: [Errno 13] Permission denied: 'x.h5'"


def test_unexpected_error_is_a_bug(monkeypatch):
    monkeypatch.setattr(camexport.store, "summary", _raises(ZeroDivisionError("division by zero")))
    quiet = invoke("show", "x.h5")
    assert quiet.exit_code == 1
    assert "Traceback" not in quiet.output
    line = quiet.output.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith("Error: camexport show failed with an unexpected ZeroDivisionError: "
                           "division by zero")
    assert "camexport bug" in line and "camexport -v show" in line

    verbose = invoke("-v", "show", "x.h5")
    assert verbose.exit_code == 1
    assert "Traceback (most recent call last)" in verbose.output
    assert "ZeroDivisionError: division by zero" in verbose.output
    assert "camexport bug" in verbose.output.strip().splitlines()[-1]


def test_interrupted_run_keeps_its_message(monkeypatch, tmp_path):
    monkeypatch.setattr(camexport.run, "run", _raises(KeyboardInterrupt()))
    result = invoke("run", "artifact", "--data", "in.h5", "--out", str(tmp_path / "o.h5"))
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: interrupted; finished samples are kept: run the same command to resume")


def test_render_index_must_be_numbers():
    result = invoke("render", "results.h5", "--out", "folder", "--index", "1,x")
    assert result.exit_code == 1 and "--index takes comma-separated sample indices" in result.output


def _choices(command: str, option: str) -> tuple:
    param = next(p for p in main.commands[command].params if p.name == option)
    assert isinstance(param.type, click.Choice)
    return tuple(param.type.choices)


def test_choices_are_the_library_tuples():
    assert _choices("run", "provider") == tuple(camexport.runtime.PROVIDERS)
    assert _choices("run", "compression") == camexport.store.COMPRESSIONS
    assert _choices("run", "metric_score") == camexport.run.METRIC_SCORES
    assert _choices("build", "precision") == camexport.precision.PRECISIONS
    assert _choices("run", "cam_dtype") == ("float32", "float16")


def test_a_choice_outside_the_tuple_is_a_usage_error():
    result = invoke("run", "artifact", "--data", "in.h5", "--out", "o.h5", "--compression", "zstd")
    assert result.exit_code == 2 and "'zstd' is not one of 'gzip', 'lzf'" in result.output
