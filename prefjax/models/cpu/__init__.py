"""CPU-only machinery, kept off the accelerator path.

    fused_attention.py    the C++ flash-attention kernel, called through the XLA FFI (kernels/*.cc)
    blocked_attention.py  einsum attention over causal query blocks (JAX)
    flash_attention.py    tiled online-softmax attention with a recomputing backward (JAX)
    defaults.py           which of them a CPU run uses when the config names none
    mlp_slices.py         the rule that cuts the gated MLP's backward into sequence slices

All of it was measured on a 2-core CPU (benchmarks/RESULTS.md), and none of it runs on
TPU or GPU unless a config names it (`model.attention_impl="blocked"` or "flash"):
there the default is jax's attention or the TPU splash kernel, and the MLP backward is
never sliced. Environment switches, read when a model is traced:

    PREFJAX_DISABLE_CPU_KERNEL=1   never build or call the C++ kernel
    PREFJAX_ATTENTION=xla          the attention a config that leaves model.attention_impl
                                   unset gets, on every backend (prefjax.models.attention);
                                   "xla" runs the CPU tests on the GPU/TPU path
"""
