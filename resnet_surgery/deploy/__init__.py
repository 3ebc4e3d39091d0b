"""Deployment: ONNX export with parity, int8 quantization, latency in onnxruntime."""
