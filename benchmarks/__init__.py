"""The benchmarks: each writes its figures under benchmarks/results/ (README, "Benchmarks")."""

import os
from pathlib import Path

#: the shared data the benchmarks read (CounterFact, zsRE, MQuAKE, the text corpus; never copied
#: into the repository): ../shared/data beside the checkout, or $EDIT_SERVE_DATA
DATA = Path(os.environ.get("EDIT_SERVE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
