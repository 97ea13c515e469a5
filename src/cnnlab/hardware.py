"""What the machine offers, and the precision `--precision auto` picks from it.

The decision is a pure function of facts (CPU flags, whether CUDA says bf16 works),
so it is tested with made-up flag sets; reading the facts is separate and imports
PyTorch only when a CUDA device is asked about.

Why bf16 only where native: CPUs with AVX512-BF16 or AMX run bf16 matrix products
about twice as fast as fp32 (measured: 388 against 177 GFLOP/s, training 1.6-2.3x
faster); CPUs without them emulate bf16 and train up to 10x slower.

`auto` is the default (the NumPy engine computes in fp32 whatever it says). Measured on two CPUs with native bf16 (an AMX Xeon
and an AVX512-BF16 EPYC), bf16 trained every network measured faster, from lenet (1.4x) to
the airbench network (2x on the EPYC, 6x on the Xeon), and to the same accuracy (airbench, 2
epochs, same seed: 80.23% bf16 against 80.25% fp32); bench/RESULTS.md has the figures.
$CNNLAB_PRECISION=fp32 (or bf16) pins what `auto` picks on a machine; the tests set it,
since they compare numbers exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
PIN_VARIABLE = "CNNLAB_PRECISION"   # fp32 or bf16: what `auto` picks on this machine


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str     # "fp32" or "bf16"
    reason: str

    def __str__(self):
        return f"{self.precision} ({self.reason})"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The flags of the first CPU listed in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def choose_precision(device_type: str, flags=frozenset(), cuda_bf16: bool = False
                     ) -> PrecisionChoice:
    """bf16 autocast where the hardware runs it natively, fp32 elsewhere.

    device_type "cpu": bf16 when the flags hold avx512_bf16 or amx_bf16.
    device_type "cuda": bf16 when torch.cuda.is_bf16_supported() said so (cuda_bf16).
    """
    if device_type == "cuda":
        if cuda_bf16:
            return PrecisionChoice("bf16", "auto: the CUDA device supports bf16")
        return PrecisionChoice("fp32", "auto: the CUDA device has no bf16 support")
    native = [f for f in BF16_CPU_FLAGS if f in flags]
    if native:
        return PrecisionChoice("bf16", f"auto: native bf16 on this CPU, {', '.join(native)}")
    return PrecisionChoice("fp32", "auto: no native bf16 on this CPU (neither avx512_bf16 nor "
                                   "amx_bf16), where emulated bf16 would be slower")


def auto_precision(device) -> PrecisionChoice:
    """choose_precision for this machine's device (a torch.device or its type name), unless
    $CNNLAB_PRECISION (fp32 or bf16) pins what `auto` means on this machine."""
    pinned = os.environ.get(PIN_VARIABLE, "").strip().lower()
    if pinned in ("fp32", "bf16"):
        return PrecisionChoice(pinned, f"auto: set by {PIN_VARIABLE}")
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch
        return choose_precision("cuda", cuda_bf16=bool(torch.cuda.is_bf16_supported()))
    return choose_precision("cpu", cpu_flags())
