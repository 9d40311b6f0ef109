"""The one exception type the patch layer raises."""


class PatchError(ValueError):
    """A patch that is malformed or does not fit the model. The message is one line that
    names the problem and, where there is one, the fix; the model is left untouched.

    Line breaks that reach a message from the input (a tensor name, a metadata value) are
    escaped here, once, so every message stays one line whatever the file holds."""

    def __init__(self, message: str):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))
