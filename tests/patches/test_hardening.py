"""Inputs that once crashed the parser or broke exact revert (issue 15): each gets one
PatchError with a one-line message, and the model is left bit-identical."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from patches import Patch, PatchError, PatchStack, from_bytes, to_bytes
from patches.format import PREFIX
from tests.patches.conftest import assert_identical, rank_one, snapshot

DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def stack(llama):
    return PatchStack(llama.model, base_model=llama.profile.name, architecture=llama.profile.architecture)


def _meta(patch: Patch, **changes) -> dict:
    meta = {PREFIX + k: v for k, v in patch.metadata().items()}
    meta[PREFIX + "id"] = patch.id
    meta.update({PREFIX + k: v for k, v in changes.items()})
    return meta


def _with_header(data: bytes, edit) -> bytes:
    """`data` with its safetensors header JSON rewritten by `edit(header) -> header`."""
    (n,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8:8 + n]))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _side(stack: PatchStack, attach: str, **entry) -> Patch:
    d = stack.model.config.hidden_size
    spec = {"type": "bias", "attach": attach, **entry}
    return Patch(kind="side_module", method="manual", base_model="", base_fingerprint="",
                 side_modules={"s": spec}, tensors={"side.s.bias": torch.zeros(d)})


def crash_cases(stack: PatchStack) -> list[tuple[str, bytes]]:
    """The inputs that raised a non-project exception before (issue 15, item 8)."""
    valid = rank_one(stack, DOWN)
    good = to_bytes(valid)
    tensors = dict(valid.tensors)
    side = _side(stack, "model.layers.1.mlp")
    deep = b"[" * 100_000 + b"]" * 100_000

    def meta_value(key, value):
        return _with_header(good, lambda h: {**h, "__metadata__": {**h["__metadata__"], PREFIX + key: value}})

    def side_raw(entry_or_modules, tensors=None, whole=False) -> bytes:
        modules = entry_or_modules if whole else {"s": entry_or_modules}
        return st_save(tensors or dict(side.tensors),
                       metadata=_meta(side, side_modules=json.dumps(modules)))

    return [
        ("header nested 100,000 deep", struct.pack("<Q", len(deep)) + deep),
        ("metadata JSON nested 100,000 deep", st_save(tensors, metadata=_meta(valid, config=deep.decode()))),
        ("data_offsets end of 1e400", _with_header(good, lambda h: json.dumps(
            {k: ({**v, "data_offsets": [0, "X"]} if k != "__metadata__" else v) for k, v in h.items()}
        ).replace('"X"', "1e400").encode())),
        ("__metadata__ as a list", _with_header(good, lambda h: {**h, "__metadata__": ["a", "b"]})),
        ("a metadata value that is not a string", meta_value("config", {"a": 1})),
        ("side_modules null", side_raw(None, whole=True)),
        ("side_modules a list", side_raw([{"type": "bias"}], whole=True)),
        ("side-module type a list", side_raw({"type": ["bias"], "attach": "model.layers.1.mlp"})),
        ("0-d rows tensor", st_save({f"delta.{DOWN}.rows": torch.tensor(1.0), f"delta.{DOWN}.index": torch.tensor([0])},
                                    metadata=_meta(valid))),
        ("0-d side tensor", side_raw({"type": "bias", "attach": "model.layers.1.mlp"},
                                     {"side.s.bias": torch.tensor(1.0)})),
        ("delta patch with side_modules=[]", st_save(tensors, metadata=_meta(valid, side_modules="[]"))),
        ("side-module config not a dict", side_raw({"type": "bias", "attach": "model.layers.1.mlp", "config": [1]})),
        ("activation a list", st_save(
            {"side.s.keys": torch.zeros(1, 64), "side.s.key_bias": torch.zeros(1), "side.s.values": torch.zeros(1, 64)},
            metadata=_meta(side, side_modules=json.dumps(
                {"s": {"type": "ffn_neurons", "attach": "model.layers.1.mlp", "config": {"activation": ["relu"]}}})))),
        ("NaN in eval metadata", st_save(tensors, metadata=_meta(valid, eval='{"reliability": NaN}'))),
        ("Infinity in config metadata", st_save(tensors, metadata=_meta(valid, config='{"lr": Infinity}'))),
        ("a number that overflows a double", st_save(tensors, metadata=_meta(valid, config='{"lr": 1e400}'))),
        ("tensor name with a newline", st_save({**tensors, "delta.model.layers.1\nmlp.weight.B": torch.ones(64, 1)},
                                               metadata=_meta(valid))),
    ]


def test_each_former_crash_is_one_patch_error(stack):
    snap = snapshot(stack.model)
    for name, data in crash_cases(stack):
        with pytest.raises(PatchError) as e:
            stack.apply(from_bytes(data))
        message = str(e.value)
        assert message and "\n" not in message and "\r" not in message, f"{name}: {message!r}"
        assert_identical(stack.model, snap)
    assert stack.ids == []


def test_writer_stores_unmeasured_figures_as_null(stack):
    patch = rank_one(stack, DOWN).replace(eval={"reliability": float("nan"), "locality": 0.5})
    loaded = from_bytes(to_bytes(patch))
    assert loaded.eval == {"reliability": None, "locality": 0.5}
    with pytest.raises(PatchError, match="strict JSON"):
        to_bytes(patch.replace(config={"lr": float("inf")}))


def test_aliased_names_share_one_base_and_revert_exactly(stack):
    """`base_model.layers...` is `model.layers...`: one delta per tensor, exact revert."""
    snap = snapshot(stack.model)
    alias = "base_model." + DOWN.removeprefix("model.")
    assert stack.model.get_parameter(alias) is stack.model.get_parameter(DOWN)
    one, two = rank_one(stack, DOWN, seed=1), rank_one(stack, DOWN, seed=2)
    both = Patch(kind="delta", method="manual", base_model="", base_fingerprint="", tensors={
        f"delta.{DOWN}.B": one.tensors[f"delta.{DOWN}.B"], f"delta.{DOWN}.A": one.tensors[f"delta.{DOWN}.A"],
        f"delta.{alias}.B": two.tensors[f"delta.{DOWN}.B"], f"delta.{alias}.A": two.tensors[f"delta.{DOWN}.A"]})
    with pytest.raises(PatchError, match="same tensor"):
        stack.apply(stack.stamp(both))
    via_alias = stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="", tensors={
        f"delta.{alias}.B": two.tensors[f"delta.{DOWN}.B"], f"delta.{alias}.A": two.tensors[f"delta.{DOWN}.A"]}))
    stack.apply(one)
    stack.apply(via_alias)
    stack.revert(one.id)
    stack.revert(via_alias.id)
    assert_identical(stack.model, snap)


def test_tied_head_and_embedding_are_one_tensor(tmp_path):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    stack = PatchStack(model, base_model="tiny", architecture="LlamaForCausalLM")
    snap = snapshot(model)

    def delta(param: str, seed: int) -> Patch:
        g = torch.Generator().manual_seed(seed)
        return stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="", tensors={
            f"delta.{param}.B": torch.randn(128, 1, generator=g) * 0.01,
            f"delta.{param}.A": torch.randn(1, 32, generator=g)}))

    embed, head = delta("model.embed_tokens.weight", 1), delta("lm_head.weight", 2)
    stack.apply(embed)
    with_embed = model.lm_head.weight.detach().clone()
    stack.apply(head)
    stack.revert(head.id)  # the embedding's delta stays
    assert torch.equal(model.lm_head.weight, with_embed)
    stack.revert(embed.id)
    assert_identical(model, snap)


@pytest.mark.parametrize("attach", ["model.layers.1.self_attn", "model.layers.1", "model.layers", "model",
                                    "model.norm", "model.layers.1.mlp.act_fn", ""])
def test_side_module_refused_where_its_hook_cannot_run(stack, attach):
    snap = snapshot(stack.model)
    with pytest.raises(PatchError, match="cannot attach|no such module|whole model|no linear"):
        stack.apply(stack.stamp(_side(stack, attach)))
    assert_identical(stack.model, snap)
    assert stack.ids == []


def test_side_module_on_an_mlp_block_runs_and_detaches(stack):
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        before = stack.model(ids).logits
    patch = stack.stamp(_side(stack, "model.layers.1.mlp").replace(tensors={"side.s.bias": torch.full((64,), 0.5)}))
    stack.apply(patch)
    with torch.no_grad():
        assert not torch.equal(stack.model(ids).logits, before)
        stack.model(inputs_embeds=torch.zeros(1, 2, 64))  # whatever way the block is called
    stack.revert(patch.id)
    with torch.no_grad():
        assert torch.equal(stack.model(ids).logits, before)


def test_float16_overflow_is_refused_in_the_target_dtype(tmp_path):
    from tests.conftest import load_tiny

    lm = load_tiny("llama-3-8b", tmp_path / "fp16", dtype="float16")
    stack = PatchStack(lm.model, base_model=lm.profile.name, architecture=lm.profile.architecture)
    snap = snapshot(lm.model)
    w = lm.model.get_parameter(DOWN)
    big = stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="", tensors={
        f"delta.{DOWN}.B": torch.full((w.shape[0], 1), 300.0, dtype=torch.float16),
        f"delta.{DOWN}.A": torch.full((1, w.shape[1]), 300.0, dtype=torch.float16)}))
    with pytest.raises(PatchError, match="non-finite in float16"):
        stack.apply(big)
    assert_identical(lm.model, snap)


def test_absurd_growth_is_refused(stack):
    snap = snapshot(stack.model)
    with pytest.raises(PatchError, match="largest magnitude"):
        stack.apply(rank_one(stack, DOWN, scale=1e5))
    assert_identical(stack.model, snap)


def test_growth_is_measured_against_the_base_after_other_changes(stack):
    """The base's largest magnitude is kept once measured: after a patch is applied and
    reverted, and with another one active, the bar is still the base's."""
    first = rank_one(stack, DOWN)
    stack.apply(first)
    stack.revert(first.id)
    stack.apply(rank_one(stack, DOWN, scale=2.0, seed=1))
    snap = snapshot(stack.model)
    with pytest.raises(PatchError, match="largest magnitude"):
        stack.apply(rank_one(stack, DOWN, scale=1e5, seed=2))
    assert_identical(stack.model, snap)


def test_side_module_with_absurd_numbers_is_refused(stack):
    """Finite, but it would overflow on the inputs that make it fire (found by the fuzzer)."""
    snap = snapshot(stack.model)
    patch = stack.stamp(_side(stack, "model.layers.1.mlp").replace(tensors={"side.s.bias": torch.full((64,), 1e30)}))
    with pytest.raises(PatchError, match="broken module"):
        stack.apply(patch)
    assert_identical(stack.model, snap)


def test_the_same_change_cannot_be_active_twice(stack):
    patch = rank_one(stack, DOWN)
    stack.apply(patch)
    with pytest.raises(PatchError, match="same change"):
        stack.apply(patch.replace(created_at="2000-01-01T00:00:00+00:00"))
    stack.revert(patch.id)
