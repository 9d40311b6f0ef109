"""The editor registry and the shape every method shares.

A method is a module with a config dataclass (the paper's defaults) and a function
`compute(ctx, requests, config) -> Patch` (ctx: an `editors.context.EditContext`; requests:
validated EditRequests), registered under its name.
Methods are imported lazily the first time the registry is consulted, so importing `editors`
stays cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from patches import Patch

log = logging.getLogger(__name__)

#: modules that register methods when imported
METHOD_MODULES: list[str] = ["editors.rome", "editors.memit", "editors.alphaedit", "editors.ft", "editors.ft_lora",
                              "editors.kn", "editors.t_patcher", "editors.calinet", "editors.serac", "editors.mend",
                              "editors.ke"]


class EditError(ValueError):
    """A request the method cannot serve (unknown method, bad config, unsupported model)."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: `prompt` (with `{}` where the subject goes, or containing the
    subject verbatim), `subject`, and the new target; `target_true` is optional."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self):
        if not self.subject or not self.target_new or not self.prompt:
            raise EditError("an edit request needs prompt, subject and target_new")
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise EditError(f"the prompt {self.prompt!r} contains neither '{{}}' nor the subject {self.subject!r}")

    @property
    def template(self) -> str:
        """The prompt with `{}` in place of the subject."""
        return self.prompt if "{}" in self.prompt else self.prompt.replace(self.subject, "{}", 1)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.format(self.subject)

    @classmethod
    def from_dict(cls, d: Mapping) -> "EditRequest":
        target = d.get("target_new")
        if isinstance(target, dict):  # ROME's {"str": ...}
            target = target.get("str")
        true = d.get("target_true")
        if isinstance(true, dict):
            true = true.get("str")
        try:
            return cls(prompt=d["prompt"], subject=d["subject"], target_new=target, target_true=true)
        except KeyError as e:
            raise EditError(f"an edit request needs {e.args[0]!r}") from None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


ComputeFn = Callable[..., Patch]


@dataclass(frozen=True)
class EditorSpec:
    name: str
    config_cls: type
    compute: ComputeFn
    kind: str = "delta"  # or "side_module"
    description: str = ""


_REGISTRY: dict[str, EditorSpec] = {}
_loaded = False


def register_editor(spec: EditorSpec) -> EditorSpec:
    if not spec.name or not spec.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"malformed editor name {spec.name!r}")
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"editor {spec.name!r} is already registered")
    if not dataclasses.is_dataclass(spec.config_cls):
        raise ValueError(f"editor {spec.name!r}: config_cls must be a dataclass")
    _REGISTRY[spec.name] = spec
    return spec


def editor(name: str, config_cls: type, kind: str = "delta", description: str = ""):
    """Decorator form: `@editor("rome", ROMEConfig)` on the compute function."""

    def wrap(fn: ComputeFn) -> ComputeFn:
        register_editor(EditorSpec(name, config_cls, fn, kind, description or (fn.__doc__ or "").strip().split("\n")[0]))
        return fn

    return wrap


def _load_methods() -> None:
    global _loaded
    if _loaded:
        return
    for module in METHOD_MODULES:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a broken method must not take the others down
            log.exception("cannot load editing method module %s", module)
    _loaded = True


def list_editors() -> list[str]:
    _load_methods()
    return sorted(_REGISTRY)


def get_editor(name: str) -> EditorSpec:
    _load_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EditError(f"unknown editing method {name!r}; known: {', '.join(sorted(_REGISTRY)) or 'none'}") from None


def make_config(spec: EditorSpec, overrides: Mapping | None):
    """The method's config with `overrides` applied; unknown keys are refused by name."""
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise EditError(f"{spec.name} has no setting {', '.join(unknown)}; settings: {', '.join(sorted(fields))}")
    try:
        return spec.config_cls(**dict(overrides or {}))
    except (TypeError, ValueError) as e:
        raise EditError(f"bad {spec.name} config: {e}") from None


def compute_patch(method: str, target, *args, **kwargs) -> Patch:
    """Compute a patch with a registered method; the model itself is never changed.

        compute_patch("rome", ctx, requests, config)                       # an EditContext
        compute_patch("rome", model, tokenizer, profile, requests, config, stack=None)

    `requests` are EditRequests or dicts. In the second form a context is made for the call;
    `stack`, when the model already carries patches, gives the base fingerprint."""
    from editors.context import EditContext

    if isinstance(target, EditContext):
        return target.compute(method, *args, **kwargs)
    tokenizer, profile, *rest = args
    stack = kwargs.pop("stack", None)
    return EditContext(target, tokenizer, profile, stack).compute(method, *rest, **kwargs)
