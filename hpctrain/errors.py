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


class AgreedError(UserError):
    """Every rank raises this together (a broadcast decision): rank 0 prints it, all exit `code`."""

    def __init__(self, message: str, code: int = 2, printed: bool = False):
        super().__init__(message)
        self.code = code
        self.printed = printed       # rank 0 said it already
