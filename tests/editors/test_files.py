"""Files several processes share (editors.files): written whole or not at all, and made by one
process while the others wait."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from editors import EditCancelled
from editors.files import made_once, save_tensors


def _hold(path, seconds: float) -> subprocess.Popen:
    """Another process that holds `path`'s lock for `seconds` once it prints 'held'."""
    code = textwrap.dedent(f"""
        import time
        from editors.files import made_once
        with made_once({str(path)!r}, "test"):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_save_tensors_writes_whole_files_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "x.safetensors"
    save_tensors(path, {"a": torch.arange(4.0)}, metadata={"k": "v"})
    assert torch.equal(load_file(str(path))["a"], torch.arange(4.0))
    with pytest.raises(Exception):
        save_tensors(path, {"a": torch.arange(4.0)[::2]})  # not contiguous: safetensors refuses it
    assert torch.equal(load_file(str(path))["a"], torch.arange(4.0))  # the old file, untouched
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]

    # writers of one file at once each write a temporary file of their own: the file is one of theirs, whole
    values = [torch.full((50_000,), float(i)) for i in range(6)]
    errors = []

    def write(v):
        try:
            save_tensors(path, {"a": v})
        except Exception as e:  # a shared temporary file: moved away under another writer
            errors.append(e)

    threads = [threading.Thread(target=write, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    a = load_file(str(path))["a"]
    assert any(torch.equal(a, v) for v in values)
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]


def test_made_once_waits_for_the_process_holding_the_lock(tmp_path, caplog):
    proc = _hold(tmp_path / "stats", 1.5)
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="editors.files"), made_once(tmp_path / "stats", "key statistics"):
        waited = time.perf_counter() - started
    proc.wait(5)
    assert waited > 1.0
    assert "waiting for another process making key statistics" in caplog.text

    started = time.perf_counter()
    with made_once(tmp_path / "stats", "key statistics"):  # free now: no wait
        assert time.perf_counter() - started < 0.5


def test_a_stop_ends_the_wait(tmp_path):
    proc = _hold(tmp_path / "stats", 30)
    try:
        stop = threading.Event()
        threading.Timer(0.5, stop.set).start()
        started = time.perf_counter()
        with pytest.raises(EditCancelled), made_once(tmp_path / "stats", "key statistics", stop):
            pass
        assert time.perf_counter() - started < 5
    finally:
        proc.kill()
        proc.wait()

