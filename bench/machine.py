"""What machine a benchmark ran on, and what its matrix multiply can do.

These machines differ from day to day (AVX2 on some, AVX-512 or AMX on others), so every run
records the CPU, its vector extensions and library versions, and measures the matmul rate that
each result is then expressed as a fraction of.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# The vector extensions that decide what a CPU run can reach (fp32 FMA width, bf16 dot products,
# AMX tiles), as /proc/cpuinfo spells them.
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
PACKAGES = ("torch", "onnxruntime", "onnx", "numpy", "captum", "tensorrt", "interactive-features")


def cpuinfo(key: str) -> str:
    """The first /proc/cpuinfo value of `key` ("" where there is none, e.g. on macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    flags = set(cpuinfo("flags").split())
    return [f for f in VECTOR_FLAGS if f in flags]


def usable_cores() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def package_versions() -> dict[str, str | None]:
    """Installed versions (None: not installed). The tensorrt stub package counts as absent."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def gpu_name() -> str | None:
    """The CUDA device's name when torch sees one (torch is imported only to ask)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "flags": cpu_flags(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "versions": package_versions(),
    }


def _rate(matmul: Any, n: int, seconds: float = 0.5) -> float:
    """GFLOP/s of `matmul()` (an n x n x n product): best of the repetitions that fit `seconds`."""
    matmul()  # warm-up: thread pools, packing buffers, cuBLAS handles
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        matmul()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2 * n**3 / best / 1e9


# n of the n x n x n matmul probe: 2048 keeps a CPU probe short; on a GPU 2048^3 is launch-bound
# (microseconds per product), 8192^3 measures the tensor cores.
PROBE_SIZES = {"cpu": 2048, "cuda": 8192}
# CPU extensions that make bf16 matmuls native; without one, torch emulates bf16 (minutes per
# probe on an AVX2 laptop).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def emulated_reason(device: str, precision: str, flags: list[str] | None = None) -> str | None:
    """Why a matmul probe at `precision` is left out on `device` (emulated), or None."""
    if device != "cpu":
        return None
    flags = cpu_flags() if flags is None else flags
    if precision == "bf16" and not set(NATIVE_BF16_FLAGS) & set(flags):
        return (
            f"bf16 matmul not probed: this CPU has none of {', '.join(NATIVE_BF16_FLAGS)} "
            "(emulated bf16 would take minutes)"
        )
    if precision == "fp16":
        return "fp16 matmul not probed on the CPU (no native fp16 GEMM in torch's CPU build)"
    return None


def probe_plan(
    device: str, precisions: list[str] | tuple[str, ...], flags: list[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """(precisions to probe, {precision: why not}) for the precisions a run benchmarks."""
    probe, notes = [], {}
    for precision in dict.fromkeys(precisions):
        why = emulated_reason(device, precision, flags)
        if why is None:
            probe.append(precision)
        else:
            notes[precision] = why
    return probe, notes


def matmul_rates(
    device: str = "cpu",
    precisions: list[str] | tuple[str, ...] = ("fp32",),
    n: int | None = None,
) -> dict[str, float]:
    """Measured matmul GFLOP/s for the benchmarked `precisions`: the hardware limit each result
    is a fraction of (see `probe_plan` for what is skipped). CPU: numpy fp32 and torch; CUDA:
    torch with TF32 off (`fp32_math`), n = PROBE_SIZES[device] unless given."""
    import numpy as np
    import torch
    from interactive_features.export.torch_backend import fp32_math

    n = n or PROBE_SIZES.get(device, 2048)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    rates: dict[str, float] = {}
    probe, _ = probe_plan(device, precisions)
    if device == "cpu" and "fp32" in probe:
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        rates["numpy-fp32"] = _rate(lambda: a @ a, n)
        rates["onnxruntime-fp32"] = _rate(_onnxruntime_matmul(a), n)
    tf32 = fp32_math() if device == "cuda" else contextlib.nullcontext()
    with tf32:
        for precision in probe:
            x = torch.randn(n, n, device=device).to(dtypes[precision])

            def product(x: torch.Tensor = x) -> None:
                torch.matmul(x, x)
                if device == "cuda":
                    torch.cuda.synchronize()

            rates[f"torch-{precision}"] = _rate(product, n)
    return rates


def _onnxruntime_matmul(a: Any) -> Callable[[], Any]:
    """a @ a as one ONNX Runtime MatMul (MLAS, the library the CPU engines run on: numpy's BLAS
    may be slower on the same cores), in a plain CPU session on every core."""
    import onnx
    from interactive_features.runtime.backends.sessions import onnxruntime_module
    from onnx import TensorProto, helper

    shape = list(a.shape)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "a"], ["c"])],
        "matmul_probe",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return lambda: session.run(None, {"a": a})


def peak_rate(rates: dict[str, float], precision: str) -> float | None:
    """The best measured matmul rate at `precision` (any library), or None if not measured."""
    found = [r for name, r in rates.items() if name.endswith(f"-{precision}")]
    return max(found) if found else None
