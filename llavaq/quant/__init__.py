"""Integer quantization primitives."""
