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


class EditCancelled(EditError):
    """An edit stopped before its end because it was cancelled (EditContext.stoppable)."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: `prompt` (with `{}` where the subject goes, or containing the
    subject verbatim), `subject`, and the new target; `target_true` is optional.
    `rephrasings`: other wordings of the prompt (each with `{}` or the subject) that the edit
    should answer too; the methods that fit to prompts fit to them as well (an edit otherwise
    carries to other wordings of its relation only as far as the model does on its own)."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrasings: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.subject or not self.target_new or not self.prompt:
            raise EditError("an edit request needs prompt, subject and target_new")
        for text in (self.prompt, *self.rephrasings):
            if not isinstance(text, str) or not text or ("{}" not in text and self.subject not in text):
                raise EditError(f"the prompt {text!r} contains neither '{{}}' nor the subject {self.subject!r}")
        if len(self.rephrasings) > MAX_REPHRASINGS:
            raise EditError(f"{len(self.rephrasings)} rephrasings in one request is over the limit "
                            f"of {MAX_REPHRASINGS}")

    @property
    def template(self) -> str:
        """The prompt with `{}` in place of the subject."""
        return _template(self.prompt, self.subject)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.format(self.subject)

    @property
    def templates(self) -> tuple[str, ...]:
        """The prompt's template, then each rephrasing's."""
        return (self.template, *(_template(r, self.subject) for r in self.rephrasings))

    @property
    def texts(self) -> tuple[str, ...]:
        """The prompt, then each rephrasing, with the subject filled in."""
        return tuple(t.format(self.subject) for t in self.templates)

    @classmethod
    def from_dict(cls, d: Mapping) -> "EditRequest":
        target = d.get("target_new")
        if isinstance(target, dict):  # ROME's {"str": ...}
            target = target.get("str")
        true = d.get("target_true")
        if isinstance(true, dict):
            true = true.get("str")
        rephrasings = d.get("rephrasings") or ()
        if not isinstance(rephrasings, (list, tuple)):
            raise EditError("an edit request's rephrasings must be a list of prompts")
        try:
            return cls(prompt=d["prompt"], subject=d["subject"], target_new=target, target_true=true,
                       rephrasings=tuple(rephrasings))
        except KeyError as e:
            raise EditError(f"an edit request needs {e.args[0]!r}") from None

    def to_dict(self) -> dict:
        """The fields that are set (no empty rephrasings: a request without them reads as it
        did before they existed, in patches and cache keys alike)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if v is not None and v != ()}


#: the most rephrasings one request may carry
MAX_REPHRASINGS = 32


def _template(prompt: str, subject: str) -> str:
    return prompt if "{}" in prompt else prompt.replace(subject, "{}", 1)


ComputeFn = Callable[..., Patch]


@dataclass(frozen=True)
class EditorSpec:
    name: str
    config_cls: type
    compute: ComputeFn
    kind: str = "delta"  # or "side_module"
    description: str = ""
    rephrasings: bool = False  # whether the method fits to requests' rephrasings (else it refuses them)


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


def editor(name: str, config_cls: type, kind: str = "delta", description: str = "", rephrasings: bool = False):
    """Decorator form: `@editor("rome", ROMEConfig)` on the compute function."""

    def wrap(fn: ComputeFn) -> ComputeFn:
        register_editor(EditorSpec(name, config_cls, fn, kind, description or (fn.__doc__ or "").strip().split("\n")[0],
                                   rephrasings))
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
