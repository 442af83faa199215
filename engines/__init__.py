"""TensorRT: the builder that turns an engine directory's ONNX graphs into plans
(tensorrt_build), the backend that runs them (tensorrt_backend) and what both share
(tensorrt_plans). Imports interactive_features.runtime, never the other way round."""
