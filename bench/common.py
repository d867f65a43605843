"""Helpers shared by the bench scripts (not a test, not part of the package).

- `matmul_tflops`: a square-matmul peak on CPU or CUDA, the roofline's numerator;
- `run_child`: run a command as a child process and return its wall time, exit status
  and peak RSS (the child's own high-water mark from wait4, and the sampled sum over the
  child's whole process tree, for engines that spawn workers);
- `TreeRssSampler`: the sampled peak RSS of any process tree (a generation server's);
- `vm_hwm_bytes`: this process's peak resident set (Linux /proc), for children to report;
- `free_port`: a localhost port for a server the bench starts.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import threading
import time
from pathlib import Path


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_tflops(dtype, device: str = "cpu", max_n: int | None = None, reps: int = 5, budget_s: float = 5.0) -> float:
    """Best-of-`reps` TFLOP/s of an n x n matmul in `dtype` on `device`.

    n doubles from 256 while one matmul takes under 0.1 s (up to `max_n`: 2048 on CPU,
    8192 on CUDA), so a dtype that takes a slow path (bf16 on a CPU without AVX512-BF16 or
    AMX) is still measured in seconds; the repetitions stop early once `budget_s` is spent.
    """
    import torch

    max_n = max_n or (8192 if device.startswith("cuda") else 2048)
    n = 256
    while True:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b  # warmup
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if n >= max_n or time.perf_counter() - t0 > 0.1:
            break
        n *= 2
    best, start = math.inf, time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return 2 * n**3 / best / 1e12


def vm_hwm_bytes() -> int | None:
    """This process's peak resident set size (VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class TreeRssSampler:
    """The largest sum of RSS over a process and its descendants, sampled in a background
    thread while the `with` block runs (`peak_bytes`)."""

    def __init__(self, pid: int, every_s: float = 0.2):
        self.pid, self.every_s, self.peak_bytes = pid, every_s, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak_bytes = max(self.peak_bytes, _tree_rss(self.pid))
            self._done.wait(self.every_s)

    def __enter__(self) -> "TreeRssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def run_child(cmd: list[str], env: dict | None = None, log_path: Path | None = None,
              sample_every_s: float = 0.2) -> dict:
    """Run `cmd`; return wall_s, returncode, ru_maxrss_bytes (the child's peak RSS, from
    wait4; it also covers descendants the child waited for, as the max of them, not the
    sum) and tree_rss_peak_bytes (the largest sampled sum over the child's process tree).
    The child's stdout and stderr go to `log_path` if given, else to ours."""
    out = open(log_path, "w") if log_path else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    try:
        with TreeRssSampler(proc.pid, sample_every_s) as tree:
            _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        raise
    finally:
        if out:
            out.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - t0, "returncode": proc.returncode,
            "ru_maxrss_bytes": usage.ru_maxrss * 1024, "tree_rss_peak_bytes": tree.peak_bytes}


def write_json(path: Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def free_port() -> int:
    """A localhost port no one listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"
