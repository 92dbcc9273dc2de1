"""What the benchmark scripts' `main`s share: the command line their results quote, and bad
input as one line on stderr with exit status 2 (as hpctrain's own commands), never a traceback."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

from hpctrain.errors import UserError

Main = Callable[[list[str] | None], int]


def command_line(argv: list[str] | None) -> str:
    """`script.py ARGS` as it was run: printed first, so a pasted result says how to get it again."""
    return " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))


def one_line_errors(main: Main) -> Main:
    """Decorate a script's `main(argv)`: a UserError becomes `script.py: error: ...` and exit 2."""
    @functools.wraps(main)
    def guarded(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as exc:
            print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr, flush=True)
            return 2
    return guarded
