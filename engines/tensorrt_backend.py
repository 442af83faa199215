"""`backend="tensorrt"`: TensorRT plans built by `interactive build --backend tensorrt`.

An engine directory's plans are weight-stripped: `bucket-WxH.PRECISION.plan` holds the kernels,
and the weights are refitted at load from the directory's one `weights.bin` (and, for fp16/bf16,
its one reduced copy `weights.PRECISION.bin`, shared by all buckets), through the TensorRT graph
the builder wrote beside it (`bucket-WxH.PRECISION.trt.onnx`) and the ONNX parser's refitter;
both files are checked against the manifest's sha256s first. A plan is tied to its TensorRT
version and GPU architecture: the manifest records both (`tensorrt.plans[bucket][precision]`),
and a plan built for another is refused with the command that rebuilds it.

Per bucket, the plan is deserialised on first use and kept in a bounded LRU with its device
buffers. A batch goes through two CUDA streams: the uint8 pixels (4x fewer bytes than float)
are copied from pinned host memory on an upload stream, and the plan runs on a compute stream;
a batch larger than the plan's profile is split into profile-sized chunks whose uploads overlap
the compute of the chunk before.

Importing this module needs neither TensorRT nor cuda-python (nor the builder, imported only for
a `lazy` build); `TensorRTBackend.unavailable_reason` says what is missing.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from interactive_features.runtime.backends.base import (
    GPU_DEVICES,
    Backend,
    check_device,
    cuda_index,
)
from interactive_features.runtime.backends.common import BucketCache, check_batch, cuda_device_count
from interactive_features.runtime.buckets import format_size
from interactive_features.runtime.manifest import PACKAGE, EngineError, EngineManifest
from interactive_features.runtime.settings import PRECISIONS

from .tensorrt_plans import (
    build_command,
    cuda_call,
    cudart_module,
    graph_name,
    here_facts,
    plan_facts,
    plan_incompatibility,
    plan_name,
    tensorrt_module,
    tensorrt_section,
    verify_reduced_weights,
)

if TYPE_CHECKING:  # mypy checks the TensorRT calls against tensorrt-stubs
    import tensorrt as trt

log = logging.getLogger(PACKAGE)


def _library_reason() -> str | None:
    try:
        tensorrt_module()
        cudart_module()
    except EngineError as err:
        return f"tensorrt: {err}"
    if cuda_device_count() == 0:
        return "tensorrt: no CUDA GPU (the CUDA driver finds none)"
    return None


class _PinnedArray:
    """Page-locked host memory viewed as a numpy array (freed by `free`)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        rt = cudart_module()
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.pointer = int(cuda_call(rt.cudaHostAlloc(nbytes, rt.cudaHostAllocDefault)))
        raw = (ctypes.c_uint8 * nbytes).from_address(self.pointer)
        self.array: np.ndarray = np.frombuffer(memoryview(raw), dtype=dtype).reshape(shape)

    def free(self) -> None:
        cuda_call(cudart_module().cudaFreeHost(self.pointer))


@dataclass
class _Slot:
    """One of two buffer sets: pinned and device input, device and pinned outputs, events."""

    pinned_in: _PinnedArray
    device_in: int
    device_out: dict[str, int]
    pinned_out: dict[str, _PinnedArray]
    uploaded: Any  # event: the input copy finished (the compute stream waits on it)
    done: Any  # event: the outputs are back in pinned memory (the host waits on it)
    rows: tuple[int, int] | None = None  # the batch rows this slot holds, until collected


class _BucketPlan:
    """One bucket's refitted engine, its execution context and two slots of buffers."""

    def __init__(
        self,
        runtime: trt.Runtime,
        logger: trt.ILogger,
        manifest: EngineManifest,
        bucket: tuple[int, int],
        precision: str,
    ) -> None:
        self.bucket = bucket
        self.input_name = manifest.input_name
        self.output_names = manifest.outputs
        plan = (manifest.directory / plan_name(bucket, precision)).read_bytes()
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineError(
                f"TensorRT could not load {plan_name(bucket, precision)} (see its log); rebuild "
                f"it with `{build_command(manifest, precision, [bucket], force=True)}`"
            )
        verify_refit_sources(manifest, precision)
        self.refit_report = _refit(
            logger, engine, manifest.directory / graph_name(bucket, precision)
        )
        self.engine = engine
        max_batch = int(engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        _check_output_dtypes(engine, self.output_names)
        self._setup(engine.create_execution_context(), max_batch)

    @classmethod
    def for_context(
        cls, context: Any, bucket: tuple[int, int], input_name: str, output_names: list[str],
        max_batch: int,
    ) -> _BucketPlan:  # fmt: skip
        """A plan around any object with the execution context's four calls (set_input_shape,
        get_tensor_shape, set_tensor_address, execute_async_v3): the GPU check runs the
        buffers, streams, events and chunking with a plain CUDA copy in TensorRT's place."""
        plan = cls.__new__(cls)
        plan.bucket, plan.input_name, plan.output_names = bucket, input_name, output_names
        plan.engine = None  # type: ignore[assignment]  # no TensorRT engine behind it
        plan.refit_report = {}
        plan._setup(context, max_batch)
        return plan

    def _setup(self, context: Any, max_batch: int) -> None:
        self.context = context
        self.max_batch = max_batch
        self._set_shape(max_batch)
        self.row_shapes: dict[str, tuple[int, ...]] = {
            name: tuple(self.context.get_tensor_shape(name))[1:] for name in self.output_names
        }
        self.slots = [self._slot() for _ in range(2)]

    def _set_shape(self, rows: int) -> None:
        width, height = self.bucket
        if not self.context.set_input_shape(self.input_name, (rows, height, width, 3)):
            raise EngineError(
                f"TensorRT refused input shape {(rows, height, width, 3)} for bucket "
                f"{format_size(self.bucket)} (profile 1..{getattr(self, 'max_batch', '?')})"
            )

    def _set_address(self, name: str, pointer: int) -> None:
        if not self.context.set_tensor_address(name, pointer):
            raise EngineError(f"TensorRT refused the device address of tensor {name!r}")

    def _slot(self) -> _Slot:
        rt = cudart_module()
        width, height = self.bucket
        pinned_in = _PinnedArray((self.max_batch, height, width, 3), np.dtype(np.uint8))
        device_out, pinned_out = {}, {}
        for name, row in self.row_shapes.items():
            shape = (self.max_batch, *row)
            pinned_out[name] = _PinnedArray(shape, np.dtype(np.float32))
            device_out[name] = int(cuda_call(rt.cudaMalloc(pinned_out[name].array.nbytes)))
        flags = rt.cudaEventDisableTiming
        return _Slot(
            pinned_in=pinned_in,
            device_in=int(cuda_call(rt.cudaMalloc(pinned_in.array.nbytes))),
            device_out=device_out,
            pinned_out=pinned_out,
            uploaded=cuda_call(rt.cudaEventCreateWithFlags(flags)),
            done=cuda_call(rt.cudaEventCreateWithFlags(flags)),
        )

    def run(self, images: np.ndarray, upload: Any, compute: Any) -> dict[str, np.ndarray]:
        """Outputs of a uint8 [N, H, W, 3] batch, in chunks of at most max_batch rows."""
        rt = cudart_module()
        n = len(images)
        results = {k: np.empty((n, *row), np.float32) for k, row in self.row_shapes.items()}
        for k, start in enumerate(range(0, n, self.max_batch)):
            slot = self.slots[k % 2]
            self._collect(slot, results)  # waits for the chunk that used this slot two steps ago
            stop = min(start + self.max_batch, n)
            rows = stop - start
            pinned = slot.pinned_in.array[:rows]
            pinned[...] = images[start:stop]
            h2d, d2h = (
                rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
            )
            cuda_call(
                rt.cudaMemcpyAsync(
                    slot.device_in, slot.pinned_in.pointer, pinned.nbytes, h2d, upload
                )
            )
            cuda_call(rt.cudaEventRecord(slot.uploaded, upload))
            cuda_call(rt.cudaStreamWaitEvent(compute, slot.uploaded, 0))
            self._set_shape(rows)
            self._set_address(self.input_name, slot.device_in)
            for name, pointer in slot.device_out.items():
                self._set_address(name, pointer)
            if not self.context.execute_async_v3(int(compute)):
                raise RuntimeError(f"TensorRT failed to enqueue bucket {format_size(self.bucket)}")
            for name, pinned_out in slot.pinned_out.items():
                nbytes = rows * pinned_out.array[0].nbytes
                cuda_call(
                    rt.cudaMemcpyAsync(
                        pinned_out.pointer, slot.device_out[name], nbytes, d2h, compute
                    )
                )
            cuda_call(rt.cudaEventRecord(slot.done, compute))
            slot.rows = (start, stop)
        for slot in self.slots:
            self._collect(slot, results)
        return results

    def _collect(self, slot: _Slot, results: dict[str, np.ndarray]) -> None:
        if slot.rows is None:
            return
        cuda_call(cudart_module().cudaEventSynchronize(slot.done))
        start, stop = slot.rows
        for name, pinned_out in slot.pinned_out.items():
            results[name][start:stop] = pinned_out.array[: stop - start]
        slot.rows = None

    def free(self) -> None:
        rt = cudart_module()
        for slot in self.slots:
            slot.pinned_in.free()
            cuda_call(rt.cudaFree(slot.device_in))
            for name, pointer in slot.device_out.items():
                cuda_call(rt.cudaFree(pointer))
                slot.pinned_out[name].free()
            cuda_call(rt.cudaEventDestroy(slot.uploaded))
            cuda_call(rt.cudaEventDestroy(slot.done))
        self.slots = []


def verify_refit_sources(manifest: EngineManifest, precision: str) -> None:
    """Check the files a refit reads against the manifest's sha256s before TensorRT reads them
    (it reads external data itself, past the runtime's checks): weights.bin's tensors and, for
    fp16/bf16, weights.PRECISION.bin. Both checks are remembered per process and file state."""
    from interactive_features.runtime.weights import verify_weights

    verify_weights(manifest.weights_path, manifest.data["weights"]["tensors"])
    if precision != "fp32":
        verify_reduced_weights(manifest, precision)


def _refit(logger: trt.ILogger, engine: trt.ICudaEngine, graph: Path) -> dict[str, Any]:
    """Fill a weight-stripped engine with the weights its graph points to; returns what the
    refitter reported (weights it has, weights still missing), logged at debug level."""
    import tensorrt as trt

    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(graph)):
        errors = [str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors)]
        raise EngineError(
            f"TensorRT could not refit from {graph}: {'; '.join(errors) or 'see its log'}"
        )
    report = refit_report(refitter)
    log.debug("refit %s: %s", graph.name, report)
    if report["missing"]:
        raise EngineError(
            f"TensorRT's refitter still misses {len(report['missing'])} weights of {graph.name} "
            f"(first: {report['missing'][:3]})"
        )
    if not refitter.refit_cuda_engine():
        raise EngineError(f"TensorRT could not refit the engine of {graph} (see its log)")
    return report


def refit_report(refitter: Any) -> dict[str, Any]:
    """The refitter's view: every refittable weight's name and those still missing."""
    return {
        "weights": sorted(str(n) for n in refitter.get_all_weights()),
        "missing": sorted(str(n) for n in refitter.get_missing_weights()),
    }


def _check_output_dtypes(engine: Any, names: list[str]) -> None:
    """Every output is float32 (the host buffers are float32; the graph divides in float32)."""
    import tensorrt as trt

    wrong = {n: str(engine.get_tensor_dtype(n)) for n in names}
    wrong = {n: t for n, t in wrong.items() if engine.get_tensor_dtype(n) != trt.DataType.FLOAT}
    if wrong:
        raise EngineError(f"TensorRT plan outputs are not float32: {wrong}")


class TensorRTBackend(Backend):
    """TensorRT plans of one precision, deserialised per bucket on first use.

    Options (also through `Extractor.open(dir, backend="tensorrt", ...)`):
    - `precision`: "fp32", "fp16" or "bf16"; default the last build's (manifest settings).
    - `lazy`: build a bucket's missing plan on first use (default: the manifest's setting,
      which `interactive build --lazy` records); building takes minutes per bucket.
    - `device`: "cuda" or "cuda:N" (default "cuda"). `max_open_buckets`: engines kept (default 4).
    """

    name = "tensorrt"
    options = frozenset({"precision", "lazy", "device", "max_open_buckets"})
    precisions = PRECISIONS

    @classmethod
    def unavailable_reason(cls, manifest: EngineManifest | None = None) -> str | None:
        """None when TensorRT, cuda-python and a GPU are here and, given a manifest, when it has
        a plan for this GPU and TensorRT version (or its build settings say `lazy`)."""
        reason = _library_reason()
        if reason is not None or manifest is None:
            return reason
        section = tensorrt_section(manifest)
        if section["settings"].get("lazy"):
            return None
        here = here_facts(manifest)
        refused: list[tuple[str, str, str]] = []  # (bucket, precision, why)
        for bucket, by_precision in section["plans"].items():
            for precision, facts in by_precision.items():
                why = plan_incompatibility(facts, here)
                if why is None:
                    return None
                refused.append((bucket, precision, why))
        if not refused:
            return (
                f"tensorrt: {manifest.directory} has no TensorRT plans; build them with "
                f"`{build_command(manifest, 'fp16')}`"
            )
        return (
            f"tensorrt: no plan in {manifest.directory} runs here ("
            + "; ".join(f"{b} {p}: {why}" for b, p, why in refused[:3])
            + f"); rebuild with `{build_command(manifest, refused[0][1], force=True)}`"
        )

    def __init__(
        self,
        manifest: EngineManifest,
        *,
        precision: str | None = None,
        lazy: bool | None = None,
        device: str = "cuda",
        max_open_buckets: int = 4,
    ) -> None:
        settings = tensorrt_section(manifest)["settings"]
        self.precision = self.check_precision(precision or settings.get("precision", "fp32"))
        self.device = check_device(device, GPU_DEVICES)
        self._plans: BucketCache[_BucketPlan] = BucketCache(
            max_open_buckets, self._load_plan, discard=_BucketPlan.free
        )
        self.manifest = manifest
        self.lazy = bool(settings.get("lazy")) if lazy is None else lazy
        tensorrt_module()  # a clear error when TensorRT is missing
        import tensorrt as trt

        rt = cudart_module()
        index = cuda_index(device)
        cuda_call(rt.cudaSetDevice(index))
        self.logger: trt.ILogger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        flags = rt.cudaStreamNonBlocking
        self.upload = cuda_call(rt.cudaStreamCreateWithFlags(flags))
        self.compute = cuda_call(rt.cudaStreamCreateWithFlags(flags))
        self._here = here_facts(manifest, index)

    def plan(self, bucket: tuple[int, int]) -> _BucketPlan:
        return self._plans.get(bucket)

    def _load_plan(self, bucket: tuple[int, int]) -> _BucketPlan:
        self._check_plan(bucket)
        return _BucketPlan(self.runtime, self.logger, self.manifest, bucket, self.precision)

    def _check_plan(self, bucket: tuple[int, int]) -> None:
        """Refuse a plan built elsewhere; build a missing one when lazy, else say how."""
        self.manifest.bucket_path(bucket)  # a bucket without a graph names the export command
        facts = plan_facts(self.manifest, bucket, self.precision)
        if facts is None and self.lazy:
            from .tensorrt_build import BuildSettings, build_plans

            settings = BuildSettings.from_manifest(
                self.manifest,
                precision=self.precision,
                force=True,  # force: build now
            )
            log.warning(
                "building the TensorRT %s plan of bucket %s (lazy)",
                self.precision,
                format_size(bucket),
            )
            self.manifest = build_plans(self.manifest.directory, settings, [bucket], log=log.info)
            facts = plan_facts(self.manifest, bucket, self.precision)
        if facts is None:
            raise EngineError(
                f"{self.manifest.directory} has no TensorRT {self.precision} plan for bucket "
                f"{format_size(bucket)}; build it with "
                f"`{build_command(self.manifest, self.precision, [bucket])}`"
            )
        why = plan_incompatibility(facts, self._here)
        if why is not None:
            max_batch = facts.get("batch", {}).get("max")
            rebuild = build_command(self.manifest, self.precision, [bucket], max_batch, force=True)
            raise EngineError(
                f"{plan_name(bucket, self.precision)} was {why}; rebuild it with `{rebuild}`"
            )
        if facts.get("gpu") != self._here["gpu"]:
            log.warning(
                "%s was tuned on %s, this is %s (same architecture): it runs, maybe slower",
                plan_name(bucket, self.precision), facts.get("gpu"), self._here["gpu"],
            )  # fmt: skip

    def run(self, bucket: tuple[int, int], images: np.ndarray) -> dict[str, np.ndarray]:
        return self.plan(bucket).run(check_batch(bucket, images), self.upload, self.compute)

    def close(self) -> None:
        self._plans.clear()  # frees each plan's buffers
        rt = cudart_module()
        for stream in (self.upload, self.compute):
            if stream is not None:
                cuda_call(rt.cudaStreamDestroy(stream))
        self.upload = self.compute = None
