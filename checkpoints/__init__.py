"""Reading and writing weights: --model-path resolution, safetensors, GGUF, Orbax."""
