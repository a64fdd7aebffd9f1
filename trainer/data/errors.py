"""The data package's error type (its own module, so every data module can raise it without cycles)."""


class DataError(ValueError):
    """Bad or missing data; the message names the file, glob or config key."""
