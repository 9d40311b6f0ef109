"""Shared fixtures: the real embedded model, tiny random-weight models of each supported
architecture (GPT-J, T5, Llama) with matching profiles, and the shared evaluation data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EDIT_SERVE_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"the shared data folder {DATA} is missing (set EDIT_SERVE_DATA)")
    return DATA


@pytest.fixture(scope="session")
def smollm():
    """The real embedded model (float32, CPU), loaded once per test session. Tests must
    not leave it changed (use a PatchStack and revert, or copy it)."""
    from edit_serve.models import load_model
    from edit_serve.profiles import get_profile

    return load_model(get_profile("smollm2-135m"))


# --- tiny random-weight models of the supported architectures -----------------------------

TINY = {
    "gpt-j-6b": lambda: __import__("transformers").GPTJConfig(
        vocab_size=512, n_positions=128, n_embd=64, n_layer=4, n_head=4, rotary_dim=8,
        bos_token_id=0, eos_token_id=1),
    "llama-3-8b": lambda: __import__("transformers").LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=1, pad_token_id=1),
    "t5-xl": lambda: __import__("transformers").T5Config(
        vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=4, num_decoder_layers=4,
        num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, tie_word_embeddings=False),
}


def _tiny_tokenizer(folder: Path):
    """A small word-level tokenizer (fast, offline) saved next to the tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(200)]
    words += ("the of in is a was born city capital language France Paris Rome Italy English French "
              "Eiffel Tower located Danielle Darrieux mother tongue employed Laurent Cars Philadelphia "
              "speaks works plays for from and to on at").split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return fast


#: the tiny decoder-only models, for what reads the subject's key at its last token (rome, memit,
#: alphaedit, v*): a test marked `decoder_only` runs on these alone; their refusal of T5 is tested
#: in tests/editors/test_editors.py
DECODERS = sorted(name for name in TINY if name != "t5-xl")
decoder_only = pytest.mark.parametrize("tiny", DECODERS, indirect=True)


@pytest.fixture(scope="session", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    """(LoadedModel) a tiny random model for each architecture profile, float32 on CPU."""
    return load_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


def load_tiny(profile_name: str, folder: Path, dtype: str = "float32"):
    import transformers

    from edit_serve.models import load_model
    from edit_serve.profiles import get_profile

    base = get_profile(profile_name)
    if not (folder / "config.json").exists():
        config = TINY[profile_name]()
        config.architectures = [base.architecture]
        torch.manual_seed(0)
        model = getattr(transformers, base.architecture)(config)
        model.save_pretrained(str(folder))
        _tiny_tokenizer(folder)
    layers = TINY[profile_name]().num_hidden_layers if profile_name != "t5-xl" else 4
    return load_model(base.with_weights(folder, num_layers=layers), dtype=dtype)
