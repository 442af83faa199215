"""Export stage (needs torch + onnx): model spec, autograd reference, analytic graph, exporter."""
