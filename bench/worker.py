"""One benchmark case in a fresh process: `python -m interactive_features.bench.worker CASE_JSON`.

A fresh process per case makes the peak RSS (VmHWM) the case's own and lets the thread counts
(OMP/MKL variables set by the parent, torch.set_num_threads, ONNX Runtime intra_op) apply from
the start. The last stdout line is `RESULT_PREFIX` + the result as JSON.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

RESULT_PREFIX = "BENCH-RESULT "


class Skip(Exception):
    """The case cannot run here (backend missing, option or precision not supported)."""


def peak_rss_mb() -> float:
    """The process's peak resident set (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_batch(case: dict[str, Any]) -> np.ndarray:
    """The engine mode's input: seeded random pixels, already at the bucket's size."""
    width, height = case["bucket"]
    rng = np.random.default_rng(case["seed"])
    return rng.integers(0, 256, (case["batch"], height, width, 3), dtype=np.uint8)


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads when this case uses torch (the OMP/MKL variables come from
    the parent's environment; ONNX Runtime gets its count as a backend option)."""
    if "torch" in sys.modules and threads > 0:
        import torch

        torch.set_num_threads(threads)


class GpuMemory:
    """Peak GPU memory of a case: torch's allocator peak, or a free-memory delta otherwise."""

    def __init__(self, device: str, torch_based: bool) -> None:
        self.torch = None
        self.torch_based = torch_based
        if device == "cuda":
            import torch

            self.torch = torch
            torch.cuda.reset_peak_memory_stats()
            self.free_at_start = torch.cuda.mem_get_info()[0]
            self.lowest_free = self.free_at_start

    def sample(self) -> None:
        if self.torch is not None and not self.torch_based:
            self.lowest_free = min(self.lowest_free, self.torch.cuda.mem_get_info()[0])

    def result(self) -> dict[str, Any]:
        if self.torch is None:
            return {"gpu_peak_mb": None, "gpu_memory_method": "n/a (cpu)"}
        if self.torch_based:
            peak = self.torch.cuda.max_memory_allocated() / 2**20
            return {"gpu_peak_mb": peak, "gpu_memory_method": "torch.cuda.max_memory_allocated"}
        used = (self.free_at_start - self.lowest_free) / 2**20
        return {"gpu_peak_mb": used, "gpu_memory_method": "cudaMemGetInfo delta"}


def open_runner(case: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[], None]]:
    """(call, close) for the case; the timing of this function is the load/compile time."""
    if case["kind"] == "backend":
        return _backend_runner(case)
    return _peer_runner(case)


def _backend_runner(case: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[], None]]:
    from interactive_features.runtime.api import Extractor
    from interactive_features.runtime.backends import open_backend
    from interactive_features.runtime.manifest import EngineError, EngineManifest

    manifest = EngineManifest.load(case["engine"])
    try:
        backend = open_backend(manifest, case["backend"], **case["options"])
    except EngineError as err:
        raise Skip(str(err)) from err
    bucket = tuple(case["bucket"])
    if case["mode"] == "e2e":
        extractor = Extractor(manifest, backend)
        files = case["files"]
        return lambda: extractor.extract(files, batch_size=case["batch"]), backend.close
    images = random_batch(case)
    return lambda: backend.run(bucket, images), backend.close


def _peer_runner(case: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[], None]]:
    from interactive_features.bench.peers import make_peer
    from interactive_features.export.conformance import engine_reference
    from interactive_features.runtime.manifest import EngineManifest

    spec, sd = engine_reference(EngineManifest.load(case["engine"]))
    peer = make_peer(case["peer"], spec, sd, case["device"], case["precision"])
    if case["mode"] == "e2e":
        return lambda: peer(decoded_batch(case)), lambda: None
    images = random_batch(case)
    return lambda: peer(images), lambda: None


def decoded_batch(case: dict[str, Any]) -> np.ndarray:
    """The e2e input of a peer: the runtime's own decoding of the files, stacked."""
    from interactive_features.runtime.images import prepare_image

    bucket = tuple(case["bucket"])
    pixels = [prepare_image(f, lambda w, h: bucket).pixels for f in case["files"]]
    return np.stack(pixels)


def output_arrays(outputs: Any) -> dict[str, np.ndarray]:
    """A call's outputs by output name: a backend's or peer's dict as it is, the e2e mode's
    Features as its layers plus each layer's heatmaps stacked (named as the engine names them)."""
    from interactive_features.runtime.api import Features
    from interactive_features.runtime.manifest import heatmap_name

    if not isinstance(outputs, Features):
        return dict(outputs)
    arrays = dict(outputs.layers)
    for layer, maps in outputs.heatmaps.items():
        arrays[heatmap_name(layer)] = np.stack([m for m in maps if m is not None])
    return arrays


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    torch_based = case["kind"] == "peer" or case.get("backend", "").startswith("torch")
    gpu = GpuMemory(case["device"], torch_based)
    started = time.perf_counter()
    call, close = open_runner(case)
    load_s = time.perf_counter() - started
    set_threads(case["threads"])
    started = time.perf_counter()
    call()  # the first call: lazy session creation, compilation, allocator growth
    first_call_s = time.perf_counter() - started
    for _ in range(case["warmup"] - 1):
        call()
    samples = []
    for _ in range(case["reps"]):
        started = time.perf_counter()
        outputs = call()
        samples.append(time.perf_counter() - started)
        gpu.sample()
    close()
    if case.get("outputs_file"):  # the last call's outputs, for the conformance verdict
        arrays: dict[str, Any] = output_arrays(outputs)
        np.savez(case["outputs_file"], **arrays)
    return {
        "status": "ok",
        "load_s": load_s,
        "first_call_s": first_call_s,
        "samples_s": samples,
        "peak_rss_mb": peak_rss_mb(),
        **gpu.result(),
    }


def run_matmul(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    from interactive_features.bench.machine import matmul_rates, probe_plan

    set_threads(case["threads"])
    precisions = case.get("precisions", ["fp32"])  # only those the run benchmarks
    return {
        "status": "ok",
        "gflops": matmul_rates(case["device"], precisions),
        "not_probed": probe_plan(case["device"], precisions)[1],
        "torch_threads": torch.get_num_threads(),
    }


def run_profile(case: dict[str, Any]) -> dict[str, Any]:
    from interactive_features.bench.profile import profile_ort

    return {"status": "ok", **profile_ort(case)}


def main(argv: list[str]) -> int:
    case = json.loads(argv[0])
    runners = {"matmul": run_matmul, "profile": run_profile}
    try:
        result = runners.get(case["kind"], run_case)(case)
    except Skip as err:
        result = {"status": "skipped", "reason": str(err)}
    except Exception as err:  # reported in the run's JSON; the other cases go on
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def parse_result(stdout: str) -> dict[str, Any] | None:
    """The worker's result line in its stdout (None when it died before printing one)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return result
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
