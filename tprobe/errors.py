"""The project's one error type: the CLI turns it into a single line and a non-zero exit."""


class TprobeError(ValueError):
    """A problem the user can fix; the message names the file or parameter and the fix.

    It subclasses ``ValueError`` so notebook code can catch it the usual way.
    """


class ChannelError(TprobeError):
    """Channels that do not fit the declared ``--channels`` (a count, a bit depth, a missing file).

    It says the options or the dataset are wrong, not one file, so preprocessing stops on it instead of
    skipping the image.
    """
