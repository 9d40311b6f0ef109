"""Property-based fuzzing of patch files (Hypothesis): mutated valid patches of every kind
raise nothing but PatchError, leave the weights bit-identical when refused, and revert
exactly when accepted. `benchmarks/fuzz.py` runs the same fuzzer for 100,000 mutations."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edit_serve.engines.hf import HFEngine
from tests.patches.fuzzing import Fuzzer


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    from tests.conftest import load_tiny

    lm = load_tiny("llama-3-8b", tmp_path_factory.mktemp("fuzz-llama"))
    return Fuzzer(HFEngine(lm).stack)  # the stack as the hf engine serves it (not started: no worker)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_patches_keep_the_properties(fuzzer, data):
    depth, mutated = data.draw(fuzzer.mutations())
    fuzzer.check(mutated)


def test_the_fuzzer_reaches_every_outcome(fuzzer):
    """The seeds themselves are accepted; the run above refused at both depths."""
    for data in fuzzer.files:
        assert fuzzer.check(data) == "accepted"
    assert fuzzer.counts["refused-parse"] > 0 and fuzzer.counts["refused-apply"] > 0
