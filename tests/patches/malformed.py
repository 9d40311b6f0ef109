"""The table of malformed patch files: each case is (name, bytes, expected message part).

Built from a valid patch for the given stack's model, so the same table serves the library
tests and the HTTP tests.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save as st_save

from patches import Patch, PatchStack, to_bytes
from patches.format import PREFIX
from patches.memory import MAX_ROWS


def _raw(tensors: dict, metadata: dict) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _meta(patch: Patch, **changes) -> dict:
    meta = {PREFIX + k: v for k, v in patch.metadata().items()}
    meta[PREFIX + "id"] = patch.id
    for k, v in changes.items():
        if v is None:
            meta.pop(PREFIX + k, None)
        else:
            meta[PREFIX + k] = v
    return meta


def malformed_cases(stack: PatchStack, valid: Patch) -> list[tuple[str, bytes, str]]:
    good = to_bytes(valid)
    (b_name, b), (a_name, a) = sorted(valid.tensors.items())[::-1]  # ".B" sorts after ".A"
    param = b_name[len("delta."):-len(".B")]
    header_len = struct.unpack("<Q", good[:8])[0]

    def remade(**tensors) -> bytes:
        """A patch whose structure is fine (valid id) but whose content does not fit."""
        return to_bytes(valid.replace(tensors=tensors))

    nan_b = b.clone()
    nan_b[0, 0] = float("nan")
    inf_a = a.clone()
    inf_a[0, -1] = float("inf")
    out, inp = b.shape[0], a.shape[1]
    gptj = Patch(kind="delta", method="manual", base_model="gpt-j-6b", base_fingerprint="0" * 32,
                 architecture="GPTJForCausalLM",
                 tensors={"delta.transformer.h.5.mlp.fc_out.weight.B": torch.ones(out, 1),
                          "delta.transformer.h.5.mlp.fc_out.weight.A": torch.ones(1, inp)})
    gptj_no_arch = gptj.replace(architecture=None)
    teleporter = Patch(kind="side_module", method="manual", base_model="", base_fingerprint="",
                       side_modules={"s": {"type": "teleporter", "attach": param.rsplit(".", 2)[0]}},
                       tensors={"side.s.bias": torch.zeros(out)})
    return [
        ("empty file", b"", "empty file"),
        ("not safetensors (text)", b"this is a plain text file, not a patch at all\n", "header length"),
        ("not safetensors (header not JSON)", struct.pack("<Q", 5) + b"hello", "header is not valid JSON"),
        ("truncated", good[:-17], "truncated"),
        ("header length larger than the file", struct.pack("<Q", len(good) * 4) + good[8:], "larger than the file"),
        ("unknown tensor name", _raw({**valid.tensors, "weights.extra": torch.zeros(2)}, _meta(valid)),
         "unknown tensor name"),
        ("wrong shape", remade(**{b_name: torch.ones(out + 3, 1), a_name: a}), "wrong shape"),
        ("inconsistent rank", _raw({b_name: torch.ones(out, 2), a_name: a}, _meta(valid)), "malformed delta"),
        ("wrong dtype (float64)", _raw({b_name: b.double(), a_name: a}, _meta(valid)), "dtype float64"),
        ("wrong dtype (int8)", _raw({b_name: b.to(torch.int8), a_name: a}, _meta(valid)), "dtype int8"),
        ("NaN", _raw({b_name: nan_b, a_name: a}, _meta(valid)), "NaN or Inf"),
        ("Inf", _raw({b_name: b, a_name: inf_a}, _meta(valid)), "NaN or Inf"),
        ("missing metadata (method)", _raw(dict(valid.tensors), _meta(valid, method=None)), "missing metadata"),
        ("no metadata at all", _raw(dict(valid.tensors), {}), "missing metadata"),
        ("metadata not JSON", _raw(dict(valid.tensors), _meta(valid, requests="{not json")), "not valid JSON"),
        ("unsupported format", _raw(dict(valid.tensors), _meta(valid, format="2")), "format"),
        ("altered after it was made", _raw({b_name: b * 2, a_name: a}, _meta(valid)), "does not match its content"),
        ("incomplete delta", _raw({b_name: b}, _meta(valid)), "incomplete"),
        ("wrong base fingerprint", to_bytes(valid.replace(base_fingerprint="f" * 32)), "wrong base model"),
        ("patch for another architecture", to_bytes(gptj), "GPTJForCausalLM"),
        ("another architecture's tensor names", to_bytes(gptj_no_arch), "unknown tensor target"),
        ("unknown side-module type", _raw(dict(teleporter.tensors), _meta(teleporter)), "unknown side-module type"),
        ("unknown kind", _raw(dict(valid.tensors), _meta(valid, kind="magic")), "unknown patch kind"),
        ("header says more data than exists", good[:8 + header_len] + b"\x00" * 4, "truncated"),
        ("requests not JSON", _raw(dict(valid.tensors), _meta(valid, requests=json.dumps({"a": 1})[:-1])),
         "not valid JSON"),
        *malformed_memory_cases(stack),
    ]


def memory_patch(stack: PatchStack, rows: int = 2, dim: int = 384, **memory) -> Patch:
    """A valid SERAC memory patch for the stack's model (random unit keys, encoder metadata as
    editors.serac writes it), with `memory` fields replaced."""
    from patches.memory import MemoryKind

    embed = next(n for n, p in stack.model.named_parameters() if "embed" in n)
    keys = torch.nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows)), dim=-1)
    texts = [{"prompt": f"Subject {i} lives in", "subject": f"Subject {i}", "target": "Rome",
              "descriptor": f"Subject {i} lives in Rome"} for i in range(rows)]
    meta = {"encoder": "all-MiniLM-L6-v2", "encoder_fingerprint": "0" * 16, "dim": dim, "fingerprint_params": [embed],
            "scope": {"cosine": 1.0, "subject": 2.0, "relation": 8.0, "bias": -8.0},
            "answer": {"template": "{descriptor}.\n", "mode": "target"}, "rows": texts, **memory}
    assert MemoryKind.name == "memory"
    return stack.stamp(Patch(kind="memory", method="serac", base_model="", base_fingerprint="",
                             tensors={"memory.keys": keys, "memory.relation_keys": keys.flip(0)}, memory=meta))


def malformed_memory_cases(stack: PatchStack) -> list[tuple[str, bytes, str]]:
    """SERAC memory patches that must be refused (wrong dimensions, NaN, missing texts, another
    base model, too large)."""
    good = memory_patch(stack)
    keys, relation_keys = good.tensors["memory.keys"], good.tensors["memory.relation_keys"]
    nan = keys.clone()
    nan[1, 7] = float("nan")
    rows = good.memory["rows"]
    missing_target = [dict(rows[0]), {k: v for k, v in rows[1].items() if k != "target"}]
    small = memory_patch(stack, rows=1, dim=8)
    many = MAX_ROWS + 1
    big_keys = torch.nn.functional.normalize(torch.ones(many, 8), dim=-1)
    big_meta = json.dumps({**small.memory, "rows": small.memory["rows"] * many})
    return [
        ("memory: keys of the wrong width", _raw({"memory.keys": keys[:, :383], "memory.relation_keys": relation_keys},
                                                 _meta(good)), "wrong shape"),
        ("memory: more keys than texts", _raw({"memory.keys": torch.cat([keys, keys[:1]]),
                                               "memory.relation_keys": relation_keys}, _meta(good)), "rows"),
        ("memory: NaN in the keys", _raw({"memory.keys": nan, "memory.relation_keys": relation_keys}, _meta(good)),
         "NaN or Inf"),
        ("memory: a row without its target",
         _raw(dict(good.tensors), _meta(good, memory=json.dumps({**good.memory, "rows": missing_target}))), "missing"),
        ("memory: no memory metadata", _raw(dict(good.tensors), _meta(good, memory=None)), "needs metadata"),
        ("memory: another base model", to_bytes(good.replace(base_fingerprint="e" * 32)), "wrong base model"),
        ("memory: too large", _raw({"memory.keys": big_keys, "memory.relation_keys": big_keys.clone()},
                                   _meta(small, memory=big_meta)), "over the limit"),
    ]
