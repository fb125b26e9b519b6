"""Quantized checkpoints: compressed-tensors config (``config``), quantized linear layers (``linear``), their matmuls per device (``ops``) and the checkpoint writer (``checkpoint``)."""
