"""The one user-facing error type of Secateurs.

It lives in the lowest package that user input reaches (``quant``; ``cuda_ext`` only sees tensors that our own
code built) so that every layer above can raise it. The CLI turns it into a one-line message and exit code 2.
"""


class InputError(ValueError):
    """Bad user input: the message names the field, file or tensor and what was expected."""
