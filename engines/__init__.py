"""Builders that turn an engine directory's ONNX graphs into device engines (TensorRT plans)."""
