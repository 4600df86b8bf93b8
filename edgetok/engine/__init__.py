"""ONNX -> TensorRT / TensorRT-RTX engines, built in a child process, with a build report."""
