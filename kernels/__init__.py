"""Device kernels, one folder per kernel: a plain-jnp reference, Pallas kernels for TPU (Mosaic) and
NVIDIA GPU (Triton), shared input validation, a table of block sizes per chip, and an `__init__`
that dispatches by platform (`backend="auto" | "pallas" | "reference"`; the reference is the CPU path,
and `pallas` on CPU runs a kernel in interpret mode). `attention/`: ragged paged attention over the
paged KV cache, with the KV write. `moe/`: the grouped matmul over expert-sorted tokens and routing."""
