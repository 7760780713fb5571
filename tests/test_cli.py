import subprocess
import sys

import pytest

from lacy_fast import __version__, cli
from lacy_fast.errors import UserError


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_no_arguments_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_unknown_command_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["trian"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and err.count("\n") == 1


def test_user_error_becomes_one_line_and_exit_2(monkeypatch, capsys):
    class Fake:
        @staticmethod
        def add_arguments(parser):
            parser.add_argument("--path")

        @staticmethod
        def run(args):
            raise UserError(f"input {args.path} does not exist; pass an existing file")

    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_module", "a fake command"))
    monkeypatch.setitem(sys.modules, "fake_module", Fake)
    assert cli.main(["fake", "--path", "/nope"]) == 2
    err = capsys.readouterr().err
    assert err == "lacy-fast fake: error: input /nope does not exist; pass an existing file\n"


def test_bad_option_is_one_line_exit_2(monkeypatch, capsys):
    class Fake:
        add_arguments = staticmethod(lambda parser: parser.add_argument("--n", type=int))
        run = staticmethod(lambda args: 0)

    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_module", "a fake command"))
    monkeypatch.setitem(sys.modules, "fake_module", Fake)
    with pytest.raises(SystemExit) as info:
        cli.main(["fake", "--n", "x"])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "lacy_fast.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "prepare" in proc.stdout


def test_launcher_local_rank_is_taken_before_the_command(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli._take_local_rank(["--local_rank=1", "train", "x=1"]) == ["train", "x=1"]
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    assert cli._take_local_rank(["train", "--local-rank", "3", "--quiet"]) == ["train", "--quiet"]
