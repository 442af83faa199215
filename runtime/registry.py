"""The backends' names and modules (see backends.py); no imports, so the CLI can list them."""

# name -> (module in this package, class name)
REGISTRY: dict[str, tuple[str, str]] = {
    "ort": ("backends", "OrtBackend"),
    "ort-cuda": ("ort_gpu", "OrtCudaBackend"),
    "ort-tensorrt": ("ort_gpu", "OrtTensorrtBackend"),
    "torch": ("torch_backend", "TorchBackend"),
    "tensorrt": ("tensorrt_backend", "TensorRTBackend"),
}
# What `auto` tries, fastest first; `ort` always works.
AUTO_ORDER = ("tensorrt", "ort-cuda", "ort")
BACKENDS = ("auto", *REGISTRY)
