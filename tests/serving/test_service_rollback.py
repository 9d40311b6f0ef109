"""PatchService when the log record of a change cannot be written after the engine made the
change: the change is undone exactly (a reverted patch goes back to its place in the apply
order), so the served weights and version are those of before (issue 15, item 2)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from edit_serve.config import EngineConfig
from edit_serve.engines.hf import HFEngine
from edit_serve.service import PatchService
from edit_serve.store import PatchStore, StoreError
from tests.patches.conftest import assert_identical, llama, rank_one, snapshot  # noqa: F401 (fixture)

DOWN = "model.layers.1.mlp.down_proj.weight"


class FailingCommits(PatchStore):
    """A store whose log opens fine but whose records fail to write (a full disk)."""

    fail = False

    @contextlib.contextmanager
    def appending(self, op, patch_id, replaces=()):
        with super().appending(op, patch_id, replaces) as commit:
            def failing():
                if self.fail:
                    raise StoreError("cannot write the patch log (No space left on device)")
                return commit()

            yield failing


@contextlib.asynccontextmanager
async def failing_service(model, root):
    """(engine, store, service): an hf engine on `model` and a PatchService over a
    FailingCommits store at `root`; the engine stops when the block ends."""
    engine = HFEngine(model, EngineConfig())
    await engine.start()
    store = FailingCommits(root)
    try:
        yield engine, store, PatchService(engine, store)
    finally:
        await engine.stop()


def test_a_revert_that_cannot_be_logged_is_undone_in_place(llama, tmp_path):
    async def main():
        async with failing_service(llama, tmp_path / "store") as (engine, store, service):
            patches = [rank_one(engine.stack, DOWN, seed=s, scale=0.1) for s in (1, 2, 3)]
            for p in patches:
                await service.add(p)
            version, snap = engine.version, snapshot(llama.model)
            store.fail = True
            with pytest.raises(StoreError):
                await service.revert(patches[0].id)  # the first of three
            assert engine.version == version and engine.stack.ids == [p.id for p in patches]
            assert_identical(llama.model, snap)  # bit for bit: same order, same sums
            with pytest.raises(StoreError):
                await service.add(rank_one(engine.stack, DOWN, seed=4, scale=0.1))
            assert engine.version == version
            assert_identical(llama.model, snap)
            assert store.active_ids() == [p.id for p in patches]

    asyncio.run(main())


def test_an_apply_measured_on_another_patch_set_changes_nothing(llama, tmp_path):
    """A guarded apply names the patch set it measured the patch on; if another change landed
    meanwhile, the apply is refused and nothing changes."""
    from edit_serve.service import Conflict

    async def main():
        async with failing_service(llama, tmp_path / "store") as (engine, store, service):
            first, second, late = (rank_one(engine.stack, DOWN, seed=s, scale=0.1) for s in (1, 2, 3))
            await service.add(first)
            measured_on = [p.id for p in service.active]
            await service.add(late)  # lands while `second` is being measured
            version, snap = engine.version, snapshot(llama.model)
            with pytest.raises(Conflict, match="changed while the patch was measured") as refused:
                await service.add(second, expect=measured_on)
            assert refused.value.code == "patch_set_changed"
            assert engine.version == version and store.active_ids() == [first.id, late.id]
            assert_identical(llama.model, snap)
            await service.add(second, expect=[first.id, late.id])  # measured on what is live: applied
            assert store.active_ids() == [first.id, late.id, second.id]

    asyncio.run(main())
