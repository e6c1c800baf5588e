"""The one exception type bild raises for bad input; the CLI prints it on one line."""


class BildError(ValueError):
    """Invalid input or configuration, explained in one line."""
