"""Vision Transformers: loading, training-free token reduction, FLOPs."""
