"""The one exception type users see: a problem they can fix, told in one line."""


class UserError(Exception):
    """Bad input (config, data file, checkpoint, launch). The CLI prints it as one line.

    The message names what is wrong and what to do about it; no traceback is shown.
    """


class PeerFailure(UserError):
    """Another rank failed and reports it itself: this rank stops without a second message."""


class InvalidArgument(UserError, ValueError):
    """A bad argument to a public function: also a ValueError, as Python code (and code written
    for Horovod, which raises ValueError) expects."""
