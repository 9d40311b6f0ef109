"""The worker side of the vllm engine: patches applied to the weights inside a vLLM worker.

vLLM mixes `PatchWorker` into its worker class (`worker_extension_cls`), and the engine calls
its methods by name through `collective_rpc`. Patches travel as patch-file bytes. The worker
runs the same `patches.PatchStack` as the hf engine, over `HFView`: the vLLM model seen under
transformers' parameter names. A name maps to a slice of vLLM's weight: fused projections
(`gate_proj` and `up_proj` live in `gate_up_proj`, `q/k/v_proj` in `qkv_proj`) are found
through the model's `packed_modules_mapping`; `down_proj` and `o_proj` are unfused. So the
base copies, the float32 arithmetic and the exact, order-free revert are PatchStack's own.

On the CPU backend vLLM packs each linear weight for oneDNN and frees the plain tensor. The
first time a patch touches such a layer, its plain weight is read back from the checkpoint
(the same values vLLM loaded, cast to the serving dtype) and kept in the layer; after every
change the touched layers are packed again from it. Tensor-parallel shards are refused: a
patch is made for the whole tensor and is not sliced to shards (see `HFView._locate`).

The engine pauses generation around every call that changes weights; the patch files of a
change are parsed and validated before (`edit_serve_stage`), so the pause does only the
weight arithmetic (`edit_serve_replace`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from patches import PatchError, PatchStack, from_bytes, to_bytes
from patches.stack import prepare, warm_up
from patches.fingerprint import exact_digest

log = logging.getLogger(__name__)


class Checkpoint:
    """Read single tensors from a model folder's safetensors files, by name."""

    def __init__(self, location: str, revision: str | None = None):
        folder = Path(location)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(location, revision=revision, local_files_only=True,
                                            allow_patterns=["*.safetensors", "*.json"]))
        self.folder = folder
        self._files: dict[str, Path] | None = None

    def names(self) -> list[str]:
        return list(self._index())

    def _index(self) -> dict[str, Path]:
        if self._files is None:
            from safetensors import safe_open

            self._files = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    self._files.update({key: path for key in f.keys()})
        return self._files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._index().get(name)
        if path is None:
            raise PatchError(f"cannot read the base weight {name} from {self.folder}: no such tensor in its "
                             "safetensors files")
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)


class HFView(nn.Module):
    """The vLLM model under transformers' parameter names: `get_parameter` returns a view
    into vLLM's (possibly fused) weight, which is what PatchStack reads and writes."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, tp_size: int = 1):
        super().__init__()
        self._vllm = [model]  # a list, so nn.Module does not register it as a submodule
        self.checkpoint = checkpoint
        self.tp_size = tp_size
        self.packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
        self.touched: set[nn.Module] = set()
        self._names: dict[tuple[int, int], str] = {}  # (layer, shard) -> the first name seen for it

    def _locate(self, name: str) -> tuple[nn.Module, list[str], int]:
        """(vLLM linear layer, HF names of its shards in order, index of `name` among them)."""
        module_name, _, leaf = name.rpartition(".")
        if leaf != "weight":
            raise AttributeError(name)
        parent, _, short = module_name.rpartition(".")
        target, shards, index = module_name, [name], 0
        for fused, parts in self.packed.items():
            if short in parts and fused != short:
                target = f"{parent}.{fused}" if parent else fused
                shards, index = [f"{parent}.{p}.weight" for p in parts], parts.index(short)
                break
        layer = self._vllm[0].get_submodule(target)  # AttributeError when missing
        layer = getattr(layer, "base_layer", layer)  # the LoRA wrapper's own linear layer
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):
            raise AttributeError(name)
        if self.tp_size > 1:
            raise PatchError(
                f"weight patches are not sliced to tensor-parallel shards: this vLLM engine runs with "
                f"tensor_parallel_size={self.tp_size}; serve with tensor_parallel_size=1 (one replica per "
                "device, scaled out with Ray Serve replicas) or use adapter mode for low-rank patches"
            )
        return layer, shards, index

    def _materialize(self, layer: nn.Module, shards: list[str]) -> None:
        """Give a CPU-packed layer its plain weight back (read from the checkpoint)."""
        if layer.weight.numel() > 0:
            return
        parts = [self.checkpoint.get(n) for n in shards]
        dense = torch.cat(parts, dim=0).to(layer.weight.dtype)  # (sum of shard rows, in)
        layer.weight = nn.Parameter(dense, requires_grad=False)
        self.repack([layer])

    def canonical_name(self, name: str) -> str:
        """One name per weight storage (a tied head and embedding are one vLLM layer), for
        PatchStack's base copies: the first name this view resolved to that storage."""
        try:
            layer, _, index = self._locate(name)
        except AttributeError:
            raise PatchError(f"unknown tensor target {name!r}: this model has no such parameter") from None
        return self._names.setdefault((id(layer), index), name)

    def get_parameter(self, target: str) -> torch.Tensor:
        layer, shards, index = self._locate(target)
        self._materialize(layer, shards)
        sizes = getattr(layer, "output_sizes", None) or [layer.weight.shape[0]]
        if len(sizes) != len(shards):
            raise PatchError(f"cannot map {target} onto vLLM's fused weight: {len(shards)} parts, {len(sizes)} "
                             "output sizes")
        start = sum(sizes[:index])
        self.touched.add(layer)
        return layer.weight.data[start:start + sizes[index]]  # (rows of this part, in)

    def get_submodule(self, target: str) -> nn.Module:
        raise PatchError(
            f"side-module patches (forward hooks on {target}) run on the hf engine only; "
            "serve with --engine hf to apply them"
        )

    @staticmethod
    def repack(layers) -> None:
        """Rebuild the CPU backend's packed weights from the plain ones (no-op elsewhere)."""
        for layer in layers:
            if hasattr(layer, "cpu_linear"):
                from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

                dispatch_cpu_unquantized_gemm(layer, remove_weight=False)


def _reply(fn):
    """Run `fn`; a PatchError comes back as {"error": message} so the engine can raise it
    as the same type (other exceptions propagate as server faults)."""
    try:
        return {"ok": fn()}
    except PatchError as e:
        return {"error": str(e)}


class PatchWorker:
    """Mixed into vLLM's worker class; each method is called by name via `collective_rpc`."""

    def edit_serve_init(self, base_model: str, architecture: str, first_edit: Sequence[str] = ()) -> None:
        """The patch stack over this worker's model; `first_edit`: the weights to prepare
        (patches.stack.prepare: their plain weights read back now, not by the first patch)."""
        from vllm.distributed import get_tensor_model_parallel_world_size

        config = self.model_runner.model_config
        view = HFView(self.model_runner.model, Checkpoint(config.model, config.revision),
                      tp_size=get_tensor_model_parallel_world_size())
        self._edit_view = view
        self._edit_stack = PatchStack(view, base_model=base_model, architecture=architecture)
        self._edit_staged = []  # the new patches of the next change (edit_serve_stage)
        view.checkpoint.names()  # the first patch then reads one tensor, not every file's header
        warm_up(self.model_runner.model_config.dtype)
        self._edit_change(lambda: prepare(self._edit_stack, first_edit))

    def _edit_change(self, op):
        """Run a weight change, then repack every layer it handed out (checks and stamps
        only read, so what was handed out before this call needs no repacking)."""
        view: HFView = self._edit_view
        view.touched.clear()
        try:
            return op()
        finally:  # also after a rollback: the plain weights are what must be served
            view.repack(view.touched)
            view.touched.clear()

    def edit_serve_check(self, data: bytes, adapter: bool = False):
        stack: PatchStack = self._edit_stack

        def check():
            patch = from_bytes(data)
            if not (adapter and patch.id in stack.ids):
                stack.check(patch)

        return _reply(check)

    def edit_serve_stamp(self, data: bytes):
        return _reply(lambda: to_bytes(self._edit_stack.stamp(from_bytes(data))))

    def edit_serve_stage(self, blobs: list[bytes]):
        """Parse and validate the new patches of the next change (outside the pause)."""

        def stage():
            self._edit_staged = [from_bytes(b) for b in blobs]

        return _reply(stage)

    def edit_serve_replace(self, ids: list[str], blobs: list[bytes] | None = None):
        """Make the active patches exactly `ids` (the staged patches among them, or the
        patches in `blobs`, parsed here when nothing was staged), at once."""
        staged, self._edit_staged = self._edit_staged, []

        def change():
            new = staged if blobs is None else [from_bytes(b) for b in blobs]
            return self._edit_change(lambda: self._edit_stack.replace(ids, new))

        return _reply(change)

    def edit_serve_digests(self, names: list[str]):
        """sha256 of the exact bytes of the named weights as this worker serves them."""
        return _reply(lambda: {n: exact_digest(self._edit_stack.parameter(n)) for n in names})
