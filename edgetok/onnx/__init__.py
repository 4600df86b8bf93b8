"""ONNX export, TensorRT-compatibility lint and ONNX Runtime validation."""
