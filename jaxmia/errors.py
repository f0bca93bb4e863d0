"""The one error type users see."""


class JaxmiaError(Exception):
    """Bad input from the user: the CLI prints it on one line and exits with code 2.

    The message names the file, field or value at fault and what was expected.
    """
