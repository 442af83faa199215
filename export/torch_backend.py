"""`backend="torch"`: the exported analytic graph run by PyTorch, on a CUDA GPU or the CPU.

The module is AnalyticGraph itself (export/graph.py), the definition every ONNX file was
exported from, with ONE set of weights for all buckets read from the engine directory: the
tensors of `weights.bin` through the manifest's table, plus the few initializers under 1 KiB that
the exporter keeps inside the graph files (small biases), read from one bucket's ONNX file with
the minimal protobuf reader below, so that this backend needs torch but not the onnx package.
Buffer names are the initializer names (`conv_3_2_weight`, ...): the ONNX exporter keeps them.

Per bucket, `compile=True` gives a torch.compile'd graph specialised to that shape
(dynamic=False); batches are padded (`padded_rows`: a power of two up to 8, then a multiple of
8) so that a bucket costs a bounded number of compilations however its batch sizes vary.
fp16/bf16 hold the weights and run the convolutions in reduced precision, with the top gradient
scaled by `seed_scale` so that nothing underflows (export/ALGORITHM.md section 6) and the
activeness collection in float32. On CUDA, TF32 is off at every precision (`fp32_math`).

The backend lives beside the graph it runs (the runtime never imports the export package); torch
and the graph module are imported only when it is used, so the registry probes
`TorchBackend.unavailable_reason` without paying for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from interactive_features.runtime.backends.base import CPU_DEVICES, Backend, check_device
from interactive_features.runtime.backends.common import check_batch
from interactive_features.runtime.manifest import EngineError, EngineManifest
from interactive_features.runtime.optional import optional_import
from interactive_features.runtime.settings import PRECISIONS, seed_scale_for
from interactive_features.runtime.weights import mapped_weights

# settings.PRECISIONS ("fp32", "fp16", "bf16") -> torch dtype name
DTYPES = dict(zip(PRECISIONS, ("float32", "float16", "bfloat16"), strict=True))
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Each distinct (bucket, padded batch) is one specialised graph; torch's default of 8 per code
# object would silently fall back to eager after the first few.
RECOMPILE_LIMIT = 512
INSTALL = "pip install 'interactive-features[torch]'"


def _torch() -> Any:
    return optional_import("torch", "the torch backend needs PyTorch", INSTALL)


def device_unavailable_reason(device: str) -> str | None:
    """None when torch can use `device` ("cpu", "cuda", "cuda:N"), otherwise why not."""
    torch = _torch()
    if not device.startswith("cuda"):
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA GPU"
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        return f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)"
    return None


class TorchBackend(Backend):
    """The analytic graph in PyTorch: one module and one set of weights for every bucket.

    Options (also through `Extractor.open(dir, backend="torch", ...)`):
    - `device`: "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N".
    - `precision`: "fp32", "bf16" or "fp16" (CPU too: fp16 is slow there unless the CPU has
      native half arithmetic, but it checks the fp16 numerics without a GPU).
    - `compile`: True, False or "auto" (on for CUDA, off on the CPU, where compiling takes longer
      than most runs gain). `compile_mode`: torch.compile's mode, default "reduce-overhead" on
      CUDA (CUDA graphs: one launch per batch instead of hundreds of kernels), "default" on the
      CPU.
    - `channels_last`: NHWC convolutions, default on for CUDA (tensor-core layout).
    - `seed_scale`: the reduced-precision seed scale (default `seed_scale_for(precision)`: 256
      for fp16/bf16, 1 for fp32).
    """

    name = "torch"
    options = frozenset(
        {"device", "precision", "compile", "compile_mode", "channels_last", "seed_scale"}
    )
    precisions = PRECISIONS

    @classmethod
    def unavailable_reason(cls, manifest: EngineManifest | None = None) -> str | None:
        """None when torch (and the exporter's graph module, which ships with this package)
        imports, and, given a manifest, when it records the export to rebuild the graph from.

        The backend runs on the CPU without a GPU; `device_unavailable_reason("cuda")` says
        whether a CUDA device is usable.
        """
        try:
            import torch  # noqa: F401

            from . import graph  # noqa: F401
        except ImportError as err:
            return f"torch backend needs PyTorch: {INSTALL} ({err})"
        if manifest is not None and "export" not in manifest.data:
            return (
                f"{manifest.directory}: the manifest has no export record to rebuild the graph from"
            )
        return None

    def __init__(
        self,
        manifest: EngineManifest,
        *,
        device: str = "auto",
        precision: str = "fp32",
        compile: bool | str = "auto",
        compile_mode: str | None = None,
        channels_last: bool | None = None,
        seed_scale: float | None = None,
    ) -> None:
        torch = _torch()
        self.manifest = manifest
        self.device = torch.device(_resolve_device(device))
        on_cuda = self.device.type == "cuda"
        self.precision = self.check_precision(precision)
        self.dtype = getattr(torch, DTYPES[precision])
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        self.compile = on_cuda if compile == "auto" else bool(compile)
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        self.compile_mode = compile_mode or ("reduce-overhead" if on_cuda else "default")
        if channels_last not in (None, True, False):
            raise ValueError(f"channels_last must be True, False or None, got {channels_last!r}")
        self.channels_last = on_cuda if channels_last is None else channels_last
        if seed_scale is None:
            seed_scale = seed_scale_for(precision)
        if not seed_scale > 0:
            raise ValueError(f"seed_scale must be positive, got {seed_scale!r}")
        self.seed_scale = float(seed_scale)
        from .spec import engine_spec

        self.spec = engine_spec(manifest)
        self.module = self._build_module()
        self._compiled: dict[tuple[tuple[int, int], int], Callable[..., Any]] = {}

    def _build_module(self) -> Any:
        from .graph import AnalyticGraph, state_dict_from_buffers

        torch = _torch()
        tensors = {n: torch.tensor(a) for n, a in engine_tensors(self.manifest).items()}
        try:
            state_dict = state_dict_from_buffers(self.spec, tensors)
        except KeyError as err:
            raise EngineError(f"{self.manifest.directory}: {err.args[0]} in the engine") from err
        module = AnalyticGraph(self.spec, state_dict, seed_scale=self.seed_scale).eval()
        # The flipped backward kernels too come from the engine (as ORT's do), not recomputed.
        stored = {n: t for n, t in tensors.items() if n.endswith("_weight_flipped")}
        unexpected = module.load_state_dict(stored, strict=False).unexpected_keys
        if unexpected:
            raise EngineError(f"{self.manifest.directory}: tensors {unexpected} fit no buffer")
        module.cast_weights(self.dtype)
        if self.channels_last:
            # Module.to takes memory_format (documented), which torch's overloads leave out.
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return module.to(self.device)

    @property
    def compiled_shapes(self) -> list[tuple[tuple[int, int], int]]:
        """(bucket, padded batch) of every compiled graph so far."""
        return list(self._compiled)

    def run(self, bucket: tuple[int, int], images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for one same-bucket uint8 [N, H, W, 3] batch, float32, manifest's names."""
        self.manifest.bucket_path(bucket)  # a bucket the engine lacks: its export command
        pixels = check_batch(bucket, images)
        torch = _torch()
        n = pixels.shape[0]
        # no_grad, not inference_mode, around compiled graphs: torch.compile under
        # inference_mode has a crash history (pytorch/pytorch#93042, #124111).
        grad_mode = torch.no_grad() if self.compile else torch.inference_mode()
        with grad_mode, self._cudnn_settings():
            x = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
            if self.compile:
                rows = padded_rows(n)
                if rows > n:
                    x = torch.cat([x, x.new_zeros((rows - n, *x.shape[1:]))])
                graph = self._compiled_graph(bucket, rows)
            else:
                graph = self.module
            values = graph(x.to(self.device, non_blocking=True))
            return {
                name: np.ascontiguousarray(v[:n].to("cpu", torch.float32).numpy())
                for name, v in zip(self.manifest.outputs, values, strict=True)
            }

    @contextlib.contextmanager
    def _cudnn_settings(self) -> Iterator[None]:
        """cuDNN autotuning on (buckets are static shapes), and TF32 off at every precision.

        PyTorch lets cuDNN run fp32 convolutions in TF32 by default: its 10-bit mantissa is
        fp16's, and an fp32 engine must meet fp32's tolerance; fp16/bf16 engines keep float32
        sums and box convolutions, which stay float32 too. Restored afterwards (global flags).
        """
        cudnn = _torch().backends.cudnn
        if self.device.type != "cuda":
            yield
            return
        saved = cudnn.benchmark
        cudnn.benchmark = True
        try:
            with fp32_math():
                yield
        finally:
            cudnn.benchmark = saved

    def _compiled_graph(self, bucket: tuple[int, int], rows: int) -> Callable[..., Any]:
        found = self._compiled.get((bucket, rows))
        if found is None:
            torch = _torch()
            compiled = torch.compile(
                self.module, mode=self.compile_mode, dynamic=False, fullgraph=True
            )

            config = torch._dynamo.config
            # torch < 2.6 calls it cache_size_limit
            key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"

            def run_compiled(x: Any) -> Any:
                with config.patch({key: RECOMPILE_LIMIT}):
                    return compiled(x)

            found = self._compiled[(bucket, rows)] = run_compiled
        return found

    def close(self) -> None:
        self._compiled.clear()
        if self.device.type == "cuda":
            _torch().cuda.empty_cache()


def padded_rows(n: int) -> int:
    """The batch a compiled graph runs for n images: the next power of two up to 8, then the
    next multiple of 8. Each distinct value is one compilation; padding wastes at most 7 rows
    past 8 (a pure power of two would waste up to half of a large batch's compute)."""
    if n <= 8:
        return 1 << (n - 1).bit_length()
    return -(-n // 8) * 8


def tf32_flags() -> dict[str, Any]:
    """The TF32 switches of cuDNN convolutions and cuBLAS matmuls, by name: torch >= 2.9's
    `fp32_precision` attributes ("ieee" or "tf32"; "none" follows the global one) where they
    exist, else the legacy `allow_tf32` booleans (deprecated from 2.9 on)."""
    backends = _torch().backends
    conv: Any = getattr(backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision") and hasattr(backends.cuda.matmul, "fp32_precision"):
        return {
            "cudnn.conv.fp32_precision": conv.fp32_precision,
            "cuda.matmul.fp32_precision": backends.cuda.matmul.fp32_precision,
        }
    return {
        "cudnn.allow_tf32": backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": backends.cuda.matmul.allow_tf32,
    }


def set_tf32_flags(flags: dict[str, Any]) -> None:
    backends = _torch().backends
    for name, value in flags.items():
        *path, attr = name.split(".")
        target = backends
        for part in path:
            target = getattr(target, part)
        setattr(target, attr, value)


def tf32_off_flags() -> dict[str, Any]:
    """What `fp32_math` sets: every switch of `tf32_flags` to full fp32."""
    return {k: ("ieee" if k.endswith("fp32_precision") else False) for k in tf32_flags()}


@contextlib.contextmanager
def fp32_math() -> Iterator[dict[str, Any]]:
    """TF32 off for cuDNN convolutions and cuBLAS matmuls inside, restored on the way out
    (the flags are process-wide). Yields the flags it set. The torch backend, the benchmark's
    reference peer and its matmul probe all run under it, so "fp32" means fp32 on a GPU and
    "vs reference" compares like with like."""
    saved = tf32_flags()
    wanted = tf32_off_flags()
    set_tf32_flags(wanted)
    try:
        yield wanted
    finally:
        set_tf32_flags(saved)


def _resolve_device(device: str) -> str:
    check_device(device, CPU_DEVICES)
    if device == "auto":
        return "cuda" if device_unavailable_reason("cuda") is None else "cpu"
    reason = device_unavailable_reason(device)
    if reason is not None:
        raise EngineError(f"torch backend, device={device!r}: {reason}")
    return device


def engine_tensors(manifest: EngineManifest) -> dict[str, np.ndarray]:
    """Every initializer of the engine by name: weights.bin's (memory-mapped) and the small ones
    stored inside the graph files (the same in every bucket; read from the first one)."""
    weights = manifest.data["weights"]
    tensors = dict(mapped_weights(manifest.directory / weights["file"], weights["tensors"]).arrays)
    if not manifest.buckets:
        raise EngineError(f"{manifest.directory}: the manifest lists no buckets")
    inline = inline_initializers(manifest.bucket_path(manifest.buckets[0]))
    tensors.update({n: a for n, a in inline.items() if n not in tensors})
    return tensors


# ONNX TensorProto.DataType -> numpy, for the types the exporter stores inline.
ONNX_DTYPES = {1: np.float32, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}


def inline_initializers(model: Path) -> dict[str, np.ndarray]:
    """The initializers an ONNX file holds itself (raw_data), without the onnx package.

    ModelProto.graph is field 7, GraphProto.initializer field 5; in a TensorProto, dims is field
    1, data_type 2, name 8, raw_data 9. External tensors (no raw_data) are left out.
    """
    data = memoryview(model.read_bytes())
    out: dict[str, np.ndarray] = {}
    for number, graph in _fields(data):
        if number != 7:
            continue
        for field, tensor in _fields(graph):
            if field == 5:
                _add_tensor(tensor, out, model)
    return out


def _add_tensor(tensor: Any, out: dict[str, np.ndarray], model: Path) -> None:
    dims: list[int] = []
    dtype, name, raw = 0, "", None
    for number, value in _fields(tensor):
        if number == 1:  # int64 dims: packed (bytes) or one varint per field
            dims += _packed_varints(value) if isinstance(value, memoryview) else [value]
        elif number == 2:
            dtype = value
        elif number == 8:
            name = bytes(value).decode()
        elif number == 9:
            raw = value
    if raw is None:
        return
    if dtype not in ONNX_DTYPES:
        raise EngineError(f"{model}: initializer {name!r} has ONNX data type {dtype}")
    out[name] = np.frombuffer(raw, dtype=ONNX_DTYPES[dtype]).reshape(dims).copy()


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _packed_varints(data: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(data):
        value, pos = _varint(data, pos)
        values.append(value)
    return values


def _fields(data: memoryview) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: int for varints, bytes views otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        else:
            raise EngineError(f"unsupported protobuf wire type {wire} (field {number})")
        yield number, value
