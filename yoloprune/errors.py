"""The one exception type yoloprune raises for problems a user can fix."""


class YoloPruneError(Exception):
    """A problem with the user's input, stated with its fix; the CLI prints it as one line."""
