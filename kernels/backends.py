"""The names of the kernel implementations a user can pick, importable without JAX (the CLI lists them
in `--help` before JAX loads). `kernels.attention` resolves these names; nothing else keeps a copy."""

# `--attention-backend`: auto (the platform's kernel: Pallas on TPU / GPU, the native kernel on CPU),
# pallas, cpu (the native CPU kernel), reference (plain jnp).
ATTENTION_BACKENDS = ("auto", "pallas", "cpu", "reference")
# Also accepted by `kernels.attention` (tests, benchmarks): a Pallas kernel in interpret mode off its platform.
ATTENTION_BACKENDS_FOR_TESTS = ("pallas_tpu", "pallas_gpu")
# `--moe-backend`.
MOE_BACKENDS = ("auto", "pallas", "reference")
# `--dense-backend`: auto (the native CPU kernel where it runs, XLA's dot elsewhere), cpu, reference (XLA's dot).
DENSE_BACKENDS = ("auto", "cpu", "reference")
