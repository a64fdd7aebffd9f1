"""The data package's error type (its own module, so every data module can raise it without cycles)."""
from trainer.errors import BadInput


class DataError(BadInput, ValueError):
    """Bad or missing data; the message names the file, glob or config key."""
