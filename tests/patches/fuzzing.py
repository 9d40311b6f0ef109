"""A fuzzer for patch files (Hypothesis): valid patches of every kind, mutated at three depths,
and the properties every mutation must keep.

- Bytes: flips, truncations, insertions, a forged header length.
- The safetensors header: entries' dtype, shape and offsets, names, `__metadata__` values
  (random JSON, NaN, deep nesting), whole-header replacement.
- Content with a valid id, so it passes the framing and reaches the deeper checks: tensor
  values (huge, NaN, Inf), shapes, dtypes, indices, patch kind, side-module attach points and
  configs, fingerprints.

`Fuzzer.check(data)` runs one mutated file through `from_bytes` and `PatchStack.apply` (the
stack of an hf engine, which checks each applied patch with a short forward pass) and
classifies it; a property that does not hold is a `Violation`:
- nothing but PatchError is raised;
- a refused patch leaves every weight bit-identical and nothing attached;
- an accepted patch gives a forward pass with finite logits, and reverts bit-exactly.

Used by `tests/patches/test_fuzz.py` (a few hundred mutations per run) and
`benchmarks/fuzz.py` (100,000).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from patches import Patch, PatchError, PatchStack, from_bytes, to_bytes
from patches.format import PREFIX, content_hash

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "XX", ""]
ATTACH_POINTS = ["model.layers.1.mlp", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn", "model.layers.1",
                 "model.layers", "model", "", "model.norm", "lm_head", "model.layers.1.mlp.act_fn", "no.such",
                 "model.layers.9.mlp", "model.embed_tokens", "base_model.layers.1.mlp", "model.layers.1\n.mlp"]
PARAMS = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight",
          "model.embed_tokens.weight", "model.norm.weight", "base_model.layers.1.mlp.down_proj.weight",
          "model.layers.1.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight", "no.such.weight",
          "model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj.weight\n"]


class Violation(AssertionError):
    """A property of the patch layer that a mutated file broke."""


def _stamped(stack: PatchStack, kind: str, tensors: dict, side_modules: dict | None = None) -> Patch:
    return stack.stamp(Patch(kind=kind, method="fuzz", base_model="", base_fingerprint="", tensors=tensors,
                             side_modules=side_modules or {}, requests=[{"prompt": "{} is", "subject": "x"}],
                             config={"lr": 0.5}, eval={"reliability": 1.0}))


def seed_patches(stack: PatchStack) -> list[Patch]:
    """One valid patch of every kind and delta form for the tiny Llama of the tests."""
    m = stack.model
    g = torch.Generator().manual_seed(0)
    down = m.get_parameter("model.layers.1.mlp.down_proj.weight")  # (d, d_ff)
    up = m.get_parameter("model.layers.0.mlp.up_proj.weight")  # (d_ff, d)
    d, d_ff = down.shape
    mlp = "model.layers.1.mlp"
    return [
        _stamped(stack, "delta", {"delta.model.layers.1.mlp.down_proj.weight.B": torch.randn(d, 2, generator=g) * 0.1,
                                  "delta.model.layers.1.mlp.down_proj.weight.A": torch.randn(2, d_ff,
                                                                                             generator=g) * 0.1}),
        _stamped(stack, "delta",
                 {"delta.model.layers.1.mlp.down_proj.weight.full": torch.randn(d, d_ff, generator=g) * 0.01}),
        _stamped(stack, "delta", {"delta.model.layers.0.mlp.up_proj.weight.rows": torch.randn(2, d, generator=g) * 0.1,
                                  "delta.model.layers.0.mlp.up_proj.weight.index": torch.tensor([3, 7])}),
        _stamped(stack, "delta",
                 {"delta.model.layers.1.mlp.down_proj.weight.cols": torch.randn(d, 3, generator=g) * 0.1,
                  "delta.model.layers.1.mlp.down_proj.weight.index": torch.tensor([0, 5, 9], dtype=torch.int32)}),
        _stamped(stack, "side_module", {"side.b.bias": torch.randn(d, generator=g) * 0.1},
                 {"b": {"type": "bias", "attach": mlp}}),
        _stamped(stack, "side_module",
                 {"side.n.keys": torch.randn(2, d, generator=g), "side.n.key_bias": torch.zeros(2),
                  "side.n.values": torch.randn(2, d, generator=g) * 0.1},
                 {"n": {"type": "ffn_neurons", "attach": mlp, "config": {"activation": "relu", "scale": 1.0}}}),
    ]


# --- strategies ---------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)), max_leaves=12)
odd_json_text = st.one_of(
    json_values.map(json.dumps),
    st.sampled_from(["NaN", '{"a": NaN}', '{"a": Infinity}', "-Infinity", '{"a": 1e400}', "[1e999]", "", "{",
                     "[" * 5000 + "]" * 5000, '{"a":' * 2000 + "1" + "}" * 2000, '"\\ud800"', "9" * 5000]),
    st.text(max_size=40),
)
floats_any = st.one_of(st.floats(width=32), st.sampled_from([1e38, -1e38, 3e4, 7e4, 1e10, 0.0, -0.0]))


@st.composite
def byte_mutation(draw, data: bytes) -> bytes:
    op = draw(st.sampled_from(["flip", "truncate", "insert", "length", "splice"]))
    b = bytearray(data)
    if op == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= draw(st.integers(1, 255))
    elif op == "truncate":
        del b[draw(st.integers(0, len(b) - 1)):]
    elif op == "insert":
        i = draw(st.integers(0, len(b)))
        b[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif op == "length":
        b[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(b)))))
    else:
        i, j = sorted(draw(st.lists(st.integers(0, len(b)), min_size=2, max_size=2)))
        b[j:j] = b[i:j]
    return bytes(b)


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def header_mutation(draw, data: bytes) -> bytes:
    header, body = _split(data)
    names = [k for k in header if k != "__metadata__"]
    meta = dict(header.get("__metadata__", {}))
    op = draw(st.sampled_from(["meta", "meta-del", "dtype", "shape", "offsets", "rename", "drop", "add", "whole",
                               "meta-type"]))
    if op == "meta":
        key = draw(st.sampled_from(sorted(meta) + [PREFIX + "side_modules", PREFIX + "eval"]))
        meta[key] = draw(odd_json_text)
        header["__metadata__"] = meta
    elif op == "meta-del":
        meta.pop(draw(st.sampled_from(sorted(meta))), None)
        header["__metadata__"] = meta
    elif op == "meta-type":
        header["__metadata__"] = draw(st.one_of(json_values, st.dictionaries(st.sampled_from(sorted(meta)),
                                                                             json_values, max_size=3)))
    elif op == "whole":
        return _join(draw(st.one_of(json_values.map(lambda v: json.dumps(v).encode()),
                                    st.binary(max_size=64))), body)
    else:
        name = draw(st.sampled_from(names))
        entry = header[name]
        if op == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from(DTYPES), json_values))
        elif op == "shape":
            entry["shape"] = draw(st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_values))
        elif op == "offsets":
            entry["data_offsets"] = draw(st.one_of(
                st.lists(st.integers(-5, len(body) + 64), min_size=2, max_size=2),
                st.lists(st.integers(0, 2**70), min_size=0, max_size=3), json_values))
        elif op == "rename":
            header[draw(st.one_of(st.text(max_size=60), st.sampled_from(
                [f"delta.{p}.{part}" for p in PARAMS
                 for part in ("A", "B", "full", "rows", "index")])))] = header.pop(name)
        elif op == "drop":
            del header[name]
        else:
            header[draw(st.text(max_size=30))] = dict(entry)
    raw = json.dumps(header)
    if op == "offsets" and draw(st.booleans()):  # numbers JSON allows but a double cannot hold
        raw = raw.replace('"data_offsets": [', '"data_offsets": [1e400, ', 1)
    return _join(raw.encode(), body)


def _raw_file(patch: Patch, **metadata_overrides) -> bytes:
    """Write `patch` without validating it, under a valid id: the content reaches the checks
    beyond the framing."""
    meta = {PREFIX + k: v for k, v in patch.metadata().items()}
    meta[PREFIX + "id"] = content_hash(patch)
    meta.update({PREFIX + k: v for k, v in metadata_overrides.items()})
    return st_save({k: v.contiguous() for k, v in patch.tensors.items()}, metadata=meta)


@st.composite
def content_mutation(draw, patch: Patch) -> bytes:
    tensors = dict(patch.tensors)
    op = draw(st.sampled_from(["values", "shape", "dtype", "index", "rename", "kind", "attach", "config",
                               "fingerprint", "drop", "extra", "scale"]))
    changes: dict = {}
    name = draw(st.sampled_from(sorted(tensors)))
    t = tensors[name]
    if op == "values" and t.is_floating_point() and t.numel():
        t = t.clone()
        flat = t.view(-1)
        for _ in range(draw(st.integers(1, 4))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(floats_any)
        tensors[name] = t
    elif op == "scale" and t.is_floating_point():
        tensors[name] = (t.float() * draw(st.sampled_from([1e2, 1e4, 1e6, 1e20, -1e3]))).to(t.dtype)
    elif op == "shape":
        shape = draw(st.lists(st.integers(0, 200), min_size=0, max_size=3))
        tensors[name] = torch.zeros(shape, dtype=t.dtype)
    elif op == "dtype":
        tensors[name] = t.to(draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                                    torch.int32, torch.int8, torch.uint8, torch.bool])))
    elif op == "index":
        tensors[name] = torch.tensor(draw(st.lists(st.integers(-2**40, 2**40), max_size=5)), dtype=torch.int64)
    elif op == "rename":
        part = draw(st.sampled_from(["A", "B", "full", "rows", "cols", "index"]))
        tensors[draw(st.one_of(st.sampled_from([f"delta.{p}.{part}" for p in PARAMS]),
                               st.sampled_from(["side.b.bias", "side.n.keys", "side.zz.bias"])))] = tensors.pop(name)
    elif op == "kind":
        changes["kind"] = draw(st.sampled_from(["delta", "side_module", "memory", ""]))
    elif op == "attach" and patch.side_modules:
        changes["side_modules"] = {k: {**v, "attach": draw(st.sampled_from(ATTACH_POINTS))}
                                   for k, v in patch.side_modules.items()}
    elif op == "config" and patch.side_modules:
        changes["side_modules"] = {k: {**v, "config": draw(st.one_of(json_values, st.fixed_dictionaries({
            "activation": st.one_of(st.sampled_from(["relu", "gelu", "silu", "tanh"]), json_values),
            "scale": st.one_of(st.floats(allow_nan=False, allow_infinity=False), json_values)}))),
            "type": draw(st.sampled_from(["bias", "ffn_neurons", v["type"], "teleporter"]))}
            for k, v in patch.side_modules.items()}
    elif op == "fingerprint":
        changes["base_fingerprint"] = draw(st.text(max_size=40))
    elif op == "drop" and len(tensors) > 1:
        del tensors[name]
    elif op == "extra":
        tensors[draw(st.text(min_size=1, max_size=40))] = torch.zeros(draw(st.integers(0, 4)))
    try:
        mutated = patch.replace(tensors=tensors, **changes)
        return _raw_file(mutated)
    except (PatchError, TypeError, ValueError):  # unwritable as strict JSON: the raw header way
        return to_bytes(patch)


@dataclass
class Fuzzer:
    """Runs mutated files against one model; counts outcomes; raises Violation."""

    stack: PatchStack
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self.snapshot = {k: v.detach().clone() for k, v in self.stack.model.state_dict().items()}
        self.seeds = seed_patches(self.stack)
        self.files = [to_bytes(p) for p in self.seeds]
        self.probe = torch.tensor([[3, 4, 5, 6]])

    def mutations(self):
        """A strategy of (depth, mutated bytes) over every seed."""
        i = st.integers(0, len(self.seeds) - 1)
        return st.one_of(
            i.flatmap(lambda k: byte_mutation(self.files[k])).map(lambda b: ("bytes", b)),
            i.flatmap(lambda k: header_mutation(self.files[k])).map(lambda b: ("header", b)),
            i.flatmap(lambda k: content_mutation(self.seeds[k])).map(lambda b: ("content", b)),
        )

    def _identical(self) -> bool:
        now = self.stack.model.state_dict()
        return all(torch.equal(now[k], v) for k, v in self.snapshot.items())

    def _hooks(self) -> int:
        return sum(len(m._forward_hooks) for m in self.stack.model.modules())

    def check(self, data: bytes) -> str:
        """Classify one file: 'refused-parse', 'refused-apply' or 'accepted'."""
        try:
            patch = from_bytes(data)
        except PatchError as e:
            outcome, message = "refused-parse", str(e)
        except Exception as e:  # noqa: BLE001 - the property under test
            raise Violation(f"from_bytes raised {type(e).__name__}: {e}") from e
        else:
            try:
                self.stack.apply(patch)
            except PatchError as e:
                outcome, message = "refused-apply", str(e)
            except Exception as e:  # noqa: BLE001
                raise Violation(f"apply raised {type(e).__name__}: {e}") from e
            else:
                outcome, message = "accepted", ""
                try:
                    with torch.no_grad():
                        logits = self.stack.model(self.probe).logits
                except Exception as e:  # noqa: BLE001
                    raise Violation(f"an accepted patch breaks the forward pass: {type(e).__name__}: {e}") from e
                finally:
                    self.stack.revert(patch.id)
                if not bool(torch.isfinite(logits).all()):
                    raise Violation("an accepted patch gives non-finite logits")
        if "\n" in message or "\r" in message:
            raise Violation(f"a multi-line error: {message!r}")
        if not self._identical():
            raise Violation(f"weights changed after a {outcome} patch")
        if self.stack.ids or self._hooks():
            raise Violation(f"something stayed attached after a {outcome} patch")
        self.counts[outcome] += 1
        return outcome
