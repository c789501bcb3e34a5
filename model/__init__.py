"""Flax NNX model definitions: typed configs, the decoder families and the architecture registry."""
