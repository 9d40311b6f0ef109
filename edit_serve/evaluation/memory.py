"""Time and peak memory of edit computations.

What "peak memory" means depends on where the model runs:
- CUDA: `torch.cuda.max_memory_allocated` over each edit (the bytes of tensors torch held on the
  device at the worst moment, the model's weights included); the allocator's cache is not counted.
- CPU: the process's peak resident set size (RSS) while an edit was computed, sampled every
  `interval` seconds by a background thread (psutil). It includes the loaded model, the Python
  runtime and everything else resident in the process, so compare it with `baseline_bytes`
  (the RSS before the first edit) to see what editing added. A spike shorter than the interval
  can be missed.

`host(device)` names the machine an edit's time was measured on: a long evaluation resumed on
another machine (edit_serve.evaluation.checkpoint) says so beside its seconds per edit.
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time

import psutil
import torch


def host(device: torch.device | str) -> str:
    """The processor that times edits on `device`: the GPU's name, or the CPU's model, its
    count, and whether its matrix units run bfloat16 (which halves v*'s step time, editors.precision)."""
    from editors.precision import resolve

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    bf16 = ", bfloat16" if resolve("auto", device) == torch.bfloat16 else ""
    return f"{model}, {os.cpu_count()} CPUs{bf16}"


class _RssSampler:
    def __init__(self, interval: float):
        self.interval, self.peak = interval, 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "_RssSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class EditMeter:
    """Accumulates wall time and peak memory over the edits measured with `measure`."""

    def __init__(self, device: torch.device | str, interval: float = 0.01):
        self.device = torch.device(device)
        self.interval = interval
        self.cuda = self.device.type == "cuda"
        self.kind = "cuda_max_memory_allocated" if self.cuda else "cpu_peak_rss"
        self.baseline_bytes = self._current()
        self.peak_bytes = 0
        self.seconds: list[float] = []  # one entry per measured call
        self.peaks: list[int] = []  # the peak of each measured call
        self.edits = 0

    def _current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return psutil.Process().memory_info().rss

    @contextlib.contextmanager
    def measure(self, edits: int):
        """Time one edit computation covering `edits` requests and track its peak memory."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        sampler = contextlib.nullcontext() if self.cuda else _RssSampler(self.interval)
        started = time.perf_counter()
        with sampler:
            yield
            if self.cuda:
                torch.cuda.synchronize(self.device)
        self.seconds.append(time.perf_counter() - started)
        self.edits += edits
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else sampler.peak
        self.peaks.append(peak)
        self.peak_bytes = max(self.peak_bytes, peak)

    def credit(self, seconds: float) -> None:
        """Add to the last measured edit what the parts it took from an interrupted run cost
        when they were made (editors.context)."""
        self.seconds[-1] += seconds

    def recall(self, peak: int | None) -> None:
        """Count the peak of an edit an interrupted run measured (a resumed evaluation's peak
        covers the patches it did not compute again)."""
        self.peak_bytes = max(self.peak_bytes, peak or 0)

    @property
    def seconds_per_edit(self) -> float | None:
        return sum(self.seconds) / self.edits if self.edits else None

    def summary(self) -> dict:
        return {"seconds_per_edit": self.seconds_per_edit, "edit_seconds_total": sum(self.seconds),
                "edits": self.edits, "peak_memory_bytes": self.peak_bytes,
                "baseline_memory_bytes": self.baseline_bytes, "peak_memory_kind": self.kind}
