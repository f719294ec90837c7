"""One error type for input the user can fix: the message names the input and the fix."""


class MetaCanvasInputError(ValueError):
    """Bad input (a size, a file, a mismatch). Nodes surface the message unchanged to the artist."""
