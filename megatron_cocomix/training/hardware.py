"""What the training log needs to know about the device: its dense peak TFLOP/s (for MFU) and memory use."""

from __future__ import annotations

import argparse
import resource
from typing import Dict, Optional

import torch

# ---------------------------------------------------------------------------------------------------------

# Dense (no sparsity) tensor-core peaks in TFLOP/s per device, by device-name substring, checked in order so
# that the more specific names come first. Columns: 16-bit (bf16 / fp16) and fp32 (no TF32).
PEAK_TFLOPS = [
    ("GB200", 2500.0, 80.0), ("B200", 2250.0, 80.0), ("B100", 1750.0, 60.0),
    ("H100 PCIe", 756.0, 51.0), ("H100 NVL", 835.0, 60.0), ("GH200", 989.0, 67.0),
    ("H200", 989.0, 67.0), ("H100", 989.0, 67.0), ("H800", 989.0, 67.0), ("H20", 148.0, 44.0),
    ("A100", 312.0, 19.5), ("A800", 312.0, 19.5), ("A30", 165.0, 10.3), ("A10G", 70.0, 31.2), ("A10", 125.0, 31.2),
    ("L40S", 362.0, 91.6), ("L40", 181.0, 90.5), ("L4", 121.0, 30.3),
    ("RTX 6000 Ada", 364.0, 91.1), ("A6000", 155.0, 38.7), ("V100", 125.0, 15.7), ("T4", 65.0, 8.1),
    ("MI300X", 1307.0, 163.4), ("MI250X", 383.0, 47.9),
]


def peak_tflops(device_name: str, sixteen_bit: bool) -> Optional[float]:
    """Peak dense TFLOP/s of a device from its name, or None when it is not in the table."""
    for key, half, single in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return half if sixteen_bit else single
    return None


def device_peak_tflops(args: argparse.Namespace) -> Optional[float]:
    """--peak-tflops, else the table's entry for this GPU in the training precision; None on CPU."""
    if args.peak_tflops:
        return float(args.peak_tflops)
    if not torch.cuda.is_available():
        return None
    return peak_tflops(torch.cuda.get_device_name(), sixteen_bit=bool(args.bf16 or args.fp16))


def memory_stats() -> Dict[str, float]:
    """This process's memory high-water marks in bytes (GPU allocator, or resident set on CPU)."""
    if torch.cuda.is_available():
        return {"max allocated": float(torch.cuda.max_memory_allocated()),
                "reserved": float(torch.cuda.memory_reserved()),
                "max reserved": float(torch.cuda.max_memory_reserved()),
                "allocated": float(torch.cuda.memory_allocated())}
    # ru_maxrss is in KiB on Linux.
    return {"max RSS": 1024.0 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
