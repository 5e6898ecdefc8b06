"""The benchmark's own instruments: they must see what they claim to measure."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil  # type: ignore[import-untyped]

from service.bench import MemorySampler

HOLD = "import sys, time; block = bytearray(96 << 20); print(1, flush=True); time.sleep(30)"


def test_memory_sampler_counts_child_processes() -> None:
    """A child holding 96 MB raises the peak of the tree by about that much."""
    alone = MemorySampler().sample()
    with subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"1\n"
            sampler = MemorySampler()
            with sampler.running():
                time.sleep(0.2)
            held = psutil.Process(child.pid).memory_info().rss
        finally:
            child.kill()
    assert held > 96 << 20
    assert sampler.peak >= alone + held - (16 << 20)
