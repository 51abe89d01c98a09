"""respin-export: rotate, quantize and export LLaMA-family models to GGUF and ONNX."""

__version__ = "0.1.0"
