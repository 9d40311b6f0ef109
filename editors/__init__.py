"""Editing methods that compute patches. Each method is one module registered by name:

    from editors import compute_patch, EditRequest
    patch = compute_patch("rome", model, tokenizer, profile, [EditRequest(...)], {"layers": [4]})

`compute_patch` never mutates the model: it returns a `patches.Patch`, and applying it is
the PatchStack's job.
"""

from editors.base import (
    EditCancelled, EditError, EditRequest, EditorSpec, compute_patch, editor, get_editor, list_editors, register_editor,
)

__all__ = ["EditCancelled", "EditError", "EditRequest", "EditorSpec", "compute_patch", "editor", "get_editor",
           "list_editors", "register_editor"]
