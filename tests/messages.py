"""Checks of the one-line error messages that bad input gets."""


def assert_one_line(err, path):
    """The message of a raised error: one line, naming `path`, saying what is wrong; the fix."""
    message = str(err.value)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message
    assert ";" in message  # what is wrong; how to fix it
    return message
