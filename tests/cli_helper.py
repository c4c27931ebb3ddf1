"""The CLI as the tests call it in-process (click's runner, exceptions not caught)."""

from click.testing import CliRunner

from camexport.cli import main


def cli(*args, ok: bool = True):
    """``camexport ARGS`` (each argument str()-ed); with ``ok``, asserts exit code 0."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result
