"""The backends' names and where their classes live ("module:Class"); no imports, so the CLI
lists them without loading numpy, onnxruntime or torch. `interactive_features.runtime.backends`
(`backend_class`, `open_backend`) imports a class only when its backend is asked for.

A backend outside the runtime package (torch beside the graph it runs, TensorRT beside its
builder) is named here by its full module path, like an entry point: the runtime never imports
`interactive_features.export` or `interactive_features.engines` unless that backend is used.
"""

# name -> "module:Class" (the class is an interactive_features.runtime.backends.Backend)
REGISTRY: dict[str, str] = {
    "ort": "interactive_features.runtime.backends.ort:OrtBackend",
    "ort-cuda": "interactive_features.runtime.backends.ort:OrtCudaBackend",
    "ort-tensorrt": "interactive_features.runtime.backends.ort:OrtTensorrtBackend",
    "torch": "interactive_features.export.torch_backend:TorchBackend",
    "tensorrt": "interactive_features.engines.tensorrt_backend:TensorRTBackend",
}
# What `auto` tries, fastest first; `ort` always works.
AUTO_ORDER = ("tensorrt", "ort-cuda", "ort")
BACKENDS = ("auto", *REGISTRY)
