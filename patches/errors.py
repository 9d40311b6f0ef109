"""The one exception type the patch layer raises."""


class PatchError(ValueError):
    """A patch that is malformed or does not fit the model. The message is one line that
    names the problem and, where there is one, the fix; the model is left untouched."""
