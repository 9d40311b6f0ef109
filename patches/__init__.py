"""The patch format and the arithmetic that applies patches to weights.

    from patches import Patch, PatchStack, load, save
"""

from patches.errors import PatchError
from patches.fingerprint import fingerprint_params
from patches.format import Delta, Patch, from_bytes, inspect, load, save, save_bytes, to_bytes, validate
from patches.side import SIDE_MODULE_TYPES, SideModuleType, register_side_module
from patches.stack import BASE_VERSION, PatchStack, patchset_version, patchset_with

__all__ = [
    "BASE_VERSION", "Delta", "Patch", "PatchError", "PatchStack", "SIDE_MODULE_TYPES",
    "SideModuleType", "fingerprint_params", "from_bytes", "inspect", "load",
    "patchset_version", "patchset_with", "register_side_module", "save", "save_bytes", "to_bytes", "validate",
]
