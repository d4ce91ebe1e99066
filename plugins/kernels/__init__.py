"""Optional attention kernels offered through ``ditkit_register_attention_kernels``.

``fa4``: FlashAttention-4 (the ``flash-attn-4`` package, CuTe-DSL kernels for Hopper and
Blackwell), registered only where ``flash_attn.cute`` is installed. Like every kernel, it runs
only when selected (``DITKIT_ATTENTION=fa4``, ``ditkit bench --attention fa4``).
"""
