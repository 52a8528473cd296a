"""The project's one error type: the CLI turns it into a single line and a non-zero exit."""


class TprobeError(ValueError):
    """A problem the user can fix; the message names the file or parameter and the fix.

    It subclasses ``ValueError`` so notebook code can catch it the usual way.
    """
