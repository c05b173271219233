"""One error type for everything a user can get wrong: bad files, configs, flags, shapes."""


class GenbenchError(ValueError):
    """A clear, user-facing error: the message names the thing and the problem.

    The CLI turns it into a one-line message and exit code 2 instead of a traceback.
    """
