"""Reading weights: --model-path resolution (local directory, .gguf file, hub id in the local cache),
the safetensors loader with its per-architecture name maps (`name_maps.py`), GGUF conversion, and the
bundled default model."""
