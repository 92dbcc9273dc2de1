"""The `hpctrain` entry point: subcommand dispatch and its one-line errors."""
from __future__ import annotations

from hpctrain import __version__
from hpctrain.cli import COMMANDS, main


def test_an_unknown_command_suggests_the_closest_one(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpctrain: error: unknown command 'trian' (did you mean 'train'?)")
    assert all(name in err for name in COMMANDS)


def test_usage_and_version(capsys):
    assert main([]) == 0 and "advise" in capsys.readouterr().out
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == __version__
