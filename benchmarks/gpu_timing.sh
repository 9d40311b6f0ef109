#!/usr/bin/env bash
# Issue 12's GPU point as one prepared device call: rome, memit and alphaedit seconds per edit
# and peak GPU memory on a GPT-J-6B-sized model with random weights (benchmarks/editing.py
# --suites stats timing --random-model gpt-j-6b --device cuda).
#
#   benchmarks/gpu_timing.sh prepare    # here, once: fills .device/ (ignored by git)
#   then the device tool's run, with carry [".device"] and a timeout_s of about 540:
#       bash benchmarks/gpu_timing.sh run
#   and unpack what comes back: tar xzf FILES_AT/gpu-timing.tar.gz -C /tmp
#
# `prepare` downloads, for the device image's Python 3.12, the wheels that image lacks (pydantic
# and what it needs), and copies SmolLM2's tokenizer files (the random model's stand-in
# tokenizer) and the CounterFact records that the timing suite edits. Nothing of it is committed.
# `run` installs the wheels under /tmp/site, prints the GPU, runs the benchmark and packs its
# results and log into $OUT/gpu-timing.tar.gz. Settings for `run`, from the environment:
# METHODS (default: rome memit alphaedit), RUNS (3), DEVICE (cuda), RANDOM_CONFIG ({}: GPT-J-6B),
# PYTHON (python3), WHEELS (1; 0 uses the Python's own packages, as a dry run on this machine does:
#   DEVICE=cpu RUNS=1 WHEELS=0 PYTHON=.venv/bin/python RANDOM_CONFIG='{"n_layer": 8, "n_embd": 256,
#   "n_head": 4, "rotary_dim": 32}' OUT=/tmp/gpu-dry bash benchmarks/gpu_timing.sh run).
set -euo pipefail
cd "$(dirname "$0")/.."
carried=.device

prepare() {
    grep -qx "/$carried/" .git/info/exclude 2>/dev/null || echo "/$carried/" >>.git/info/exclude
    rm -rf "$carried" && mkdir -p "$carried/whl" "$carried/tokenizer" "$carried/data"
    local pkg version
    for pkg in pydantic pydantic_core annotated_types typing_inspection typing_extensions; do
        version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$pkg'))")
        .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$carried/whl" "$pkg==$version"
    done
    local tokenizer data
    tokenizer=$(.venv/bin/python -c "from edit_serve.models import weights_location
from edit_serve.profiles import get_profile
print(weights_location(get_profile('smollm2-135m')))")
    cp "$tokenizer"/tokenizer.json "$tokenizer"/tokenizer_config.json "$carried/tokenizer/"
    cp "$tokenizer"/*.jinja "$carried/tokenizer/" 2>/dev/null || true
    data=$(.venv/bin/python -c "from benchmarks import DATA; print(DATA)")
    cp "$data/counterfact.jsonl" "$carried/data/"
    du -sh "$carried"
    echo "ready: run 'bash benchmarks/gpu_timing.sh run' on the device machine with carry [\"$carried\"]"
}

run() {
    local python=${PYTHON:-python3} results=/tmp/gpu-timing
    if [ "${WHEELS:-1}" = 1 ]; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$carried"/whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 EDIT_SERVE_CACHE=/tmp/edit_serve_cache
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    rm -rf "$results" && mkdir -p "$results" "${OUT:?set OUT to a folder for the results}"
    # shellcheck disable=SC2086  # METHODS is a list
    "$python" benchmarks/editing.py --suites stats timing --methods ${METHODS:-rome memit alphaedit} \
        --device "${DEVICE:-cuda}" --random-model gpt-j-6b --random-config "${RANDOM_CONFIG:-{\}}" \
        --tokenizer "$carried/tokenizer" --data-dir "$carried/data" --runs "${RUNS:-3}" --out "$results" \
        2>&1 | tee "$results/run.log" | grep -v -e "it/s]" -e "s/it]" || true
    tar czf "$OUT/gpu-timing.tar.gz" -C /tmp gpu-timing
    grep -h "random-gpt-j-6b" "$results/editing.md" || echo "no figures: see run.log in the archive"
}

case "${1:-}" in
prepare) prepare ;;
run) run ;;
*) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
