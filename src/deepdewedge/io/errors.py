"""The error for bad user input."""


class InputError(ValueError):
    """Bad user input: the message is one line naming the file and the fix."""
