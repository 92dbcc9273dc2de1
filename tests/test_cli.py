"""The `hpctrain` entry point: subcommand dispatch, its one-line errors, and `--help` without torch."""
from __future__ import annotations

import subprocess
import sys

import pytest

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


# --- `--help` without torch ------------------------------------------------------------------------

_HELP_PROBE = """
import sys
from hpctrain.cli import main
try:
    main([sys.argv[1], "--help"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("IMPORTED", " ".join(sorted(m for m in ("torch", "hpctrain.train", "horovod") if m in sys.modules)))
"""


@pytest.mark.parametrize("command", COMMANDS)
def test_help_does_not_import_torch(command, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _HELP_PROBE, command], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: hpctrain {command}")
    imported = proc.stdout.rsplit("IMPORTED", 1)[1].split()
    assert imported == [], f"`hpctrain {command} --help` imported {imported}"


def test_train_command_lives_in_a_light_module():
    module, _ = COMMANDS["train"]
    assert module == "hpctrain.commands.train"


