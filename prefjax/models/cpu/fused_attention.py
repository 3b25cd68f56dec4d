"""Fused causal attention on CPU: a C++ kernel (kernels/flash_attention_cpu.cc) called through the XLA FFI.

Why: XLA:CPU runs attention as separate ops, so at 1024+ tokens small models spend
their step moving score tiles through memory (benchmarks/RESULTS.md: torch's fused
CPU kernel made TRL 1.3-2.2x faster there). The kernel keeps each [64, 64] tile in
cache from scores to output, saves only the output and one log-sum-exp per query,
and recomputes the probabilities in the backward pass, like flash attention.

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else
g++, else c++) for this CPU (-march=native) and cached under
`$PREFJAX_KERNEL_CACHE` (default ~/.cache/prefjax/kernels), keyed by the source,
the compiler, the jaxlib headers and the CPU. `available()` is False, with the
reason in `unavailable_reason()`, when no compiler works; callers then use
prefjax's JAX attention paths. Supports float32, head_dim in SUPPORTED_HEAD_DIMS,
GQA, and any mask that excludes keys later than the query (packing,
padding, prefix-shared branches). Under a multi-device mesh the kernel runs per
batch shard (shard_map over the mesh axes the "batch" rule names).

The mask comes either as a [B, T, T] array or as the `TokenLayout` it is made of
(positions, segment ids, branches, sliding window): the model passes the layout,
so the step holds no [B, T, T] mask (16 MiB per 16 rows of 1024 tokens, 64 at
2048), and the kernel builds only the mask tiles each work item reads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from prefjax import sharding

Array = jax.Array
log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("kernels") / "flash_attention_cpu.cc"
SUPPORTED_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128, 256)
_FORWARD, _BACKWARD = "prefjax_attention_forward", "prefjax_attention_backward"
_LAYOUT_FORWARD, _LAYOUT_BACKWARD = "prefjax_attention_layout_forward", "prefjax_attention_layout_backward"


class TokenLayout(NamedTuple):
    """What a self-attention mask is made of (prefjax.models.attention.attention_mask, then
    index_causal): a query sees a key of its own segment (not 0), at a position not later
    (and less than `window` back, when set), not later in the row, and on branch 0 or its own."""

    positions: Array  # [B, T] int32
    segments: Array  # [B, T] int32, 0 = padding
    branches: Array  # [B, T] int32 (zeros without prefix-shared rows)
    window: Optional[int] = None


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("PREFJAX_KERNEL_CACHE", Path.home() / ".cache" / "prefjax" / "kernels"))


def _build(compiler: str) -> Path:
    include = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-std=c++20", "-fPIC", "-shared", "-w", f"-I{include}"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), compiler, version, " ".join(flags),
                                    (Path(include) / "xla/ffi/api/ffi.h").read_text(),
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"flash_attention_cpu-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build to a private name, then rename: concurrent test workers may build at once.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(built)], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE} failed:\n{result.stderr[-2000:]}")
        os.replace(built, target)
    return target


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
    """Builds (or finds) the kernel and registers its two FFI targets; (ok, reason if not)."""
    if os.environ.get("PREFJAX_DISABLE_CPU_KERNEL"):
        return False, "disabled by PREFJAX_DISABLE_CPU_KERNEL"
    compiler = _compiler()
    if compiler is None:
        return False, "no C++ compiler found (set CXX or install g++)"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(library.PrefjaxAttentionForward), platform="cpu")
        jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(library.PrefjaxAttentionBackward), platform="cpu")
        jax.ffi.register_ffi_target(_LAYOUT_FORWARD, jax.ffi.pycapsule(library.PrefjaxAttentionLayoutForward),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_LAYOUT_BACKWARD, jax.ffi.pycapsule(library.PrefjaxAttentionLayoutBackward),
                                    platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("prefjax fused CPU attention unavailable, using the JAX flash path: %s", err)
        return False, str(err)
    return True, ""


def available() -> bool:
    """Whether the fused kernel is built and registered (builds it on the first call)."""
    return _load()[0]


def unavailable_reason() -> str:
    return _load()[1]


def supports(q_BxTxNxH: Array, logit_softcap: Optional[float]) -> bool:
    """Whether the kernel computes this call: float32, a supported head_dim, no soft-capping."""
    return (q_BxTxNxH.dtype == jnp.float32 and q_BxTxNxH.shape[-1] in SUPPORTED_HEAD_DIMS
            and logit_softcap is None and available())


def _mask_operands(mask: Union[Array, tuple[Array, ...]], window: int) -> tuple[tuple[Array, ...], dict, str, str]:
    """(operands, attributes, forward target, backward target) of a dense mask or a layout's
    (positions, segments, branches)."""
    if isinstance(mask, tuple):
        return mask, {"window": np.int64(window)}, _LAYOUT_FORWARD, _LAYOUT_BACKWARD
    return (mask,), {}, _FORWARD, _BACKWARD


def _forward_call(q, k, v, mask, scale, window):
    b, t, n, _ = q.shape
    operands, attrs, target, _ = _mask_operands(mask, window)
    call = jax.ffi.ffi_call(target, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                     jax.ShapeDtypeStruct((b, n, t), jnp.float32)), vmap_method="sequential")
    return call(q, k, v, *operands, scale=np.float32(scale), **attrs)


# mask: a [B, T, T] bool array, or a layout's (positions, segments, branches) int32 [B, T] each.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, scale, window):
    return _forward_call(q, k, v, mask, scale, window)[0]


def _attention_fwd(q, k, v, mask, scale, window):
    out, lse = _forward_call(q, k, v, mask, scale, window)
    return out, (q, k, v, mask, out, lse)


def _attention_bwd(scale, window, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    operands, attrs, _, target = _mask_operands(mask, window)
    call = jax.ffi.ffi_call(target, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                     jax.ShapeDtypeStruct(k.shape, jnp.float32),
                                     jax.ShapeDtypeStruct(v.shape, jnp.float32)), vmap_method="sequential")
    dq, dk, dv = call(q, k, v, *operands, out, lse, d_out.astype(jnp.float32), scale=np.float32(scale), **attrs)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def fused_attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, mask: Union[Array, TokenLayout], *,
                    scale: float) -> Array:
    """Causal GQA softmax attention by the C++ kernel, under `mask`: a [B, T, T] array (which
    must exclude later keys) or the TokenLayout it is made of (no [B, T, T] array then).

    Fully masked query rows (padding) give 0. Call `supports` first; under a
    multi-device mesh each batch shard runs its own kernel call.
    """
    if not available():
        raise RuntimeError(f"prefjax fused CPU attention is unavailable: {unavailable_reason()}")
    scale = float(scale)
    window = 0
    if isinstance(mask, TokenLayout):
        window = int(mask.window or 0)
        mask = tuple(jnp.asarray(x, jnp.int32) for x in (mask.positions, mask.segments, mask.branches))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask, scale, window)
    # A custom call is opaque to the SPMD partitioner (it would gather every operand onto
    # each device); rows are independent, so each batch shard runs the kernel on its own rows.
    batch = sharding.logical_to_spec(("batch",), (q_BxTxNxH.shape[0],), mesh)[0]
    spec4 = jax.sharding.PartitionSpec(batch, None, None, None)
    mask_spec = (jax.sharding.PartitionSpec(batch, None),) * 3 if isinstance(mask, tuple) else \
        jax.sharding.PartitionSpec(batch, None, None)
    run = jax.shard_map(functools.partial(_attention, scale=scale, window=window), mesh=mesh,
                        in_specs=(spec4, spec4, spec4, mask_spec), out_specs=spec4, check_vma=False)
    return run(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask)
