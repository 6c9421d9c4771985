"""The one exception type for bad user input.

Library code raises `UserInputError` with a single sentence that names the input, the value
and what would be accepted; the apps turn it into that sentence on stderr and exit status 1,
without a traceback and before any output is written.
"""


class UserInputError(ValueError):
    """Bad input from the user (a flag, a file, a dataset): the message is for people."""


class RunError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss): the message is for people."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C after writing a checkpoint; the message says how to continue."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message
