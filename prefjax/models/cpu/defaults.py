"""Which attention a CPU run uses when the config names none.

Measured on a 2-core CPU (benchmarks/RESULTS.md): the fused C++ kernel beats every JAX
path wherever it applies (float32, a supported head_dim, no soft-cap, a C++ compiler).
Without it, blocked attention with 64-query blocks is fastest up to T = 512; beyond that
the tiled flash path is as fast or faster and, above all, keeps no [B, heads, T, T]
probabilities for the backward pass (1 GiB per layer at B = 16, 8 heads, T = 2048).
"""

from __future__ import annotations

from typing import Callable, Optional

FLASH_FROM = 1024
DEFAULT_BLOCK = {"blocked": 64, "flash": 128}


def default_attention(length: Optional[int], fused_supported: Callable[[], bool]) -> str:
    """"fused" where the kernel supports the call, else "blocked" up to 512 tokens and "flash" beyond.

    `fused_supported` is asked first and only here, so other backends never build the kernel.
    """
    if fused_supported():
        return "fused"
    return "flash" if length is not None and length >= FLASH_FROM else "blocked"
