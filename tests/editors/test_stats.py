"""Key statistics: the right second moment, cached on disk by model + layer + corpus + count,
kept in memory, unchanged by applied patches; corpora: file, model samples, bad names."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from editors import EditCancelled
from editors.context import EditContext
from editors.corpus import CorpusError, CorpusSpec, corpus_windows, nucleus_sample
from editors.files import made_once, save_tensors
from editors.stats import (
    StatsConfig, cache_file, layer_stats, lock_file, model_fingerprint, precompute_stats, stats_root,
)
from patches import Patch, PatchStack


@pytest.fixture()
def llama(tmp_path, monkeypatch):
    """A fresh tiny Llama (its own object, so the in-memory statistics start empty) and cache."""
    from tests.conftest import load_tiny

    monkeypatch.setenv("EDIT_SERVE_CACHE", str(tmp_path / "cache"))
    return load_tiny("llama-3-8b", tmp_path / "model")


@pytest.fixture()
def text_file(tmp_path):
    words = "the of in is a was born city capital language France Paris Rome Italy English French".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (30,), generator=g).tolist()) for _ in range(40)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def test_second_moment_of_the_mlp_keys(llama, text_file):
    model, tok, profile = llama.model, llama.tokenizer, llama.profile
    cfg = StatsConfig(corpus=str(text_file), samples=8, length=16, batch_size=3)
    c = layer_stats(model, tok, profile, [1], cfg)[1]
    windows = corpus_windows(model, tok, CorpusSpec(str(text_file)), 8, 16, None)
    keys = []
    hook = model.get_submodule(profile.mlp_out(1)).register_forward_hook(lambda m, a, o: keys.append(a[0]))
    with torch.no_grad():
        model(input_ids=windows)
    hook.remove()
    k = keys[0].reshape(-1, keys[0].shape[-1]).double()  # (n*T, d_ff)
    assert c.dtype == torch.float32 and c.shape == (k.shape[1], k.shape[1])
    assert torch.allclose(c.double(), k.T @ k / len(k), rtol=1e-4, atol=1e-7)



def test_statistics_another_process_is_computing_are_waited_for_not_computed_again(llama, text_file):
    model, tok, profile = llama.model, llama.tokenizer, llama.profile
    cfg = StatsConfig(str(text_file), 8, 16)
    fingerprint, corpus_id = model_fingerprint(model, profile), CorpusSpec(str(text_file)).ident()
    d = model.get_submodule(profile.mlp_out(1)).in_features
    found, theirs = {}, 7 * torch.eye(d)
    # a lock held through a file of its own is held as another process holds it (flock)
    with made_once(lock_file(fingerprint, corpus_id, cfg), "the other process's statistics"):
        waiting = threading.Thread(target=lambda: found.update(layer_stats(model, tok, profile, [1], cfg)))
        waiting.start()
        time.sleep(1.0)
        assert waiting.is_alive() and not found  # it waits rather than compute them too
        save_tensors(cache_file(fingerprint, profile.mlp_out(1), corpus_id, cfg), {"mom2": theirs})
    waiting.join(30)
    assert torch.equal(found[1], theirs)  # read what the other process wrote: not computed a second time

    # an edit cancelled while it waits ends at once (EditContext.stoppable reaches the wait)
    ctx, stop, outcome = EditContext(model, tok, profile), threading.Event(), []
    other = StatsConfig(str(text_file), 4, 16)

    def edit():
        try:
            with ctx.stoppable(stop):
                ctx.stats([2], other)
        except EditCancelled as e:
            outcome.append(e)

    with made_once(lock_file(fingerprint, corpus_id, other), "the other process's statistics"):
        waiting = threading.Thread(target=edit)
        waiting.start()
        time.sleep(0.5)
        stop.set()
        waiting.join(5)
        assert not waiting.is_alive() and len(outcome) == 1
    assert ctx._stop is None  # the stop is the block's only

def test_cached_on_disk_by_key_and_kept_in_memory(llama, text_file, tmp_path):
    from tests.conftest import load_tiny

    model, tok, profile = llama.model, llama.tokenizer, llama.profile
    files = precompute_stats(model, tok, profile, [1, 2], corpus=str(text_file), n=8, length=16)
    assert set(files) == {1, 2} and all(f.is_file() for f in files.values())
    assert all(f.is_relative_to(stats_root() / model_fingerprint(model, profile)) for f in files.values())
    assert profile.mlp_out(1) in files[1].name and ".8x16." in files[1].name
    first = layer_stats(model, tok, profile, [1], StatsConfig(str(text_file), 8, 16))[1]

    other = load_tiny("llama-3-8b", tmp_path / "model")  # same checkpoint, a new object: reads the file
    mtime = files[1].stat().st_mtime_ns
    again = layer_stats(other.model, tok, other.profile, [1], StatsConfig(str(text_file), 8, 16))[1]
    assert torch.equal(first, again) and files[1].stat().st_mtime_ns == mtime

    files[1].unlink()  # in memory now: the model object does not go back to disk
    assert torch.equal(layer_stats(model, tok, profile, [1], StatsConfig(str(text_file), 8, 16))[1], first)
    assert not files[1].exists()

    more = precompute_stats(model, tok, profile, [1], corpus=str(text_file), n=4, length=16)
    assert more[1] != files[1] and more[1].is_file()  # another sample count is another entry


def test_fingerprint_ignores_applied_edits_but_not_another_checkpoint(llama):
    model, profile = llama.model, llama.profile
    before = model_fingerprint(model, profile)
    name = profile.mlp_out(2) + ".weight"
    stack = PatchStack(model)
    patch = stack.stamp(Patch(kind="delta", method="manual", base_model="", base_fingerprint="",
                              tensors={f"delta.{name}.full": torch.ones(model.get_parameter(name).shape)}))
    stack.apply(patch)
    try:
        assert model_fingerprint(model, profile) == before
    finally:
        stack.revert(patch.id)
    with torch.no_grad():
        model.get_parameter("model.embed_tokens.weight")[0, 0] += 1.0
    assert model_fingerprint(model, profile) != before


def test_model_sampled_corpus_is_cached_and_reproducible(llama, tmp_path):
    model, tok = llama.model, llama.tokenizer
    spec = CorpusSpec("model")
    ids = corpus_windows(model, tok, spec, 5, 12, tmp_path / "corpus")
    assert ids.shape == (5, 12) and ids.dtype == torch.long
    assert (tmp_path / "corpus" / f"{spec.ident()}-5x12.safetensors").is_file()
    assert torch.equal(corpus_windows(model, tok, spec, 5, 12, None), ids)  # same seed, same text
    assert not torch.isin(ids, torch.tensor([tok.eos_token_id])).any()  # every window is full text



def test_model_corpus_decoding_writes_what_generate_writes(llama, monkeypatch):
    """The decode loop (left-padded openers, their positions, the key/value cache) continues
    each opener as transformers' `generate` does: with the draw made greedy, the windows are
    `generate`'s greedy continuations, token for token."""
    import editors.corpus as corpus

    model, tok = llama.model, llama.tokenizer
    monkeypatch.setattr(corpus, "nucleus_sample", lambda logits, top_p: logits.argmax(-1))
    ids = corpus.sample_windows(model, tok, 12, 8, CorpusSpec("model"))  # the 10th opener is two words
    seeds = [tok(corpus.OPENERS[i]).input_ids for i in range(12)]
    width, pad = max(map(len, seeds)), tok.pad_token_id
    assert len({len(s) for s in seeds}) > 1  # some rows are padded
    padded = torch.tensor([[pad] * (width - len(s)) + s for s in seeds])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seeds])
    eos = [tok.eos_token_id]
    greedy = model.generate(input_ids=padded, attention_mask=mask, do_sample=False, max_new_tokens=8,
                            suppress_tokens=eos, pad_token_id=pad)
    assert torch.equal(greedy[:, width:], ids)

def test_nucleus_sampling_draws_from_the_top_p_set_renormalized():
    """The tokens drawn are those of transformers' TopPLogitsWarper's set, at its probabilities
    renormalized: frequencies over 40,000 draws within 0.01 of them."""
    from transformers import TopPLogitsWarper

    torch.manual_seed(0)
    probs = torch.tensor([0.05, 0.5, 0.01, 0.3, 0.1, 0.04])  # the set at 0.9: tokens 1, 3 and 4 (0.9 of the mass)
    for logits, top_p in [(probs.log(), 0.9), (probs.log(), 1.0), (torch.randn(50) * 2, 0.8)]:
        kept = torch.isfinite(TopPLogitsWarper(top_p)(None, logits[None].clone())[0])
        want = torch.where(kept, logits.softmax(-1), 0.0)
        draws = nucleus_sample(logits.expand(40_000, -1), top_p)
        seen = torch.bincount(draws, minlength=len(logits)).float() / len(draws)
        assert not seen[~kept].any(), "a token outside the top-p set was drawn"
        assert (seen - want / want.sum()).abs().max() < 0.01
    assert nucleus_sample(torch.tensor([[0.0, float("-inf"), 0.0]]).expand(1000, -1), 1.0).ne(1).all()
    with pytest.raises(ValueError, match="top_p"):
        nucleus_sample(probs.log()[None], 0.0)


def test_bad_corpora_are_refused(llama, tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        CorpusSpec(str(tmp_path / "missing.txt")).ident()
    tiny = tmp_path / "short.txt"
    tiny.write_text("the city")
    with pytest.raises(CorpusError, match="fewer than"):
        corpus_windows(llama.model, llama.tokenizer, CorpusSpec(str(tiny)), 4, 64, None)
    with pytest.raises(CorpusError, match="dataset"):  # no `datasets` package, or no hub
        corpus_windows(llama.model, llama.tokenizer, CorpusSpec("datasets:wikitext"), 4, 64, None)
    with pytest.raises(ValueError, match="samples"):
        StatsConfig(samples=0)


def test_sizes_and_shrinkage_default_per_corpus_kind(text_file):
    from editors.rome import ROMEConfig
    from editors.stats import DEFAULT_SIZES, shrunk

    model = StatsConfig()
    assert (model.samples, model.length, model.shrinkage) == DEFAULT_SIZES["model"]
    read = StatsConfig(str(text_file))
    assert (read.samples, read.length, read.shrinkage) == (1000, 128, 0.0)  # a file costs no sampling
    assert StatsConfig(str(text_file), samples=8, shrinkage=0.5).shrinkage == 0.5  # what is set stays set
    assert ROMEConfig(stats_corpus=str(text_file)).stats() == read
    with pytest.raises(ValueError, match="shrinkage"):
        StatsConfig(shrinkage=-1.0)
    c = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
    assert shrunk(c, 0.0) is c
    assert torch.equal(shrunk(c, 0.5), torch.tensor([[5.5, 1.0], [1.0, 3.5]]))  # + 0.5 * mean(diag) * I
    # heavy shrinkage turns ROME's direction C^-1 k toward k itself
    k = torch.tensor([1.0, 1.0])
    far = torch.linalg.solve(shrunk(c, 1e6), k)
    assert torch.nn.functional.cosine_similarity(far, k, dim=0) > 0.999


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_a_multi_layer_edit_reads_its_layers_in_one_pass(llama, text_file, monkeypatch, method):
    """MEMIT and AlphaEdit ask for every layer's statistics before their per-layer solves: from
    an empty cache one pass over the corpus computes them all (one pass per layer cost a new
    user's first MEMIT edit on SmolLM2 four extra passes, minutes on 2 cores)."""
    import editors.stats
    from editors import EditRequest, compute_patch

    passes = []
    real = editors.stats.compute_mom2
    monkeypatch.setattr(editors.stats, "compute_mom2", lambda *a, **k: passes.append(a[2]) or real(*a, **k))
    request = EditRequest("The capital of {} is", "France", "Rome", "Paris")
    config = {"layers": [1, 2, 3], "stats_corpus": str(text_file), "stats_samples": 8, "stats_length": 16,
              "v_steps": 2}
    patch = compute_patch(method, llama.model, llama.tokenizer, llama.profile, [request], config)
    assert sorted(patch.deltas()) == sorted(llama.profile.mlp_out(x) + ".weight" for x in (1, 2, 3))
    assert passes == [[llama.profile.mlp_out(x) for x in (1, 2, 3)]]
