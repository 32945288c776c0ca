"""The networks: dlib's face network in Keras, the backbones and heads, losses, the feature
cache, training with exact resume, and where it runs (devices, data parallel)."""
