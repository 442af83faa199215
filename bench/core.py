"""First measurements of the core engine (issue "Core"), in one run on one machine:

1. seconds per 512x512 image: our ONNX Runtime engine vs the autograd reference (torch eager);
2. the engine directory's size on disk (full VGG-16, `common` buckets);
3. process RSS with one bucket open vs four (each in a fresh process);
4. transposed convolution vs convolution with a flipped kernel in ONNX Runtime (backward layers);
5. the OrtBackend's memory-for-speed options (release_memory, prepack).

    python bench/core.py --engine engines/vgg16-last-p2-random0 [--reps 3] [--json out.json]

The engine must hold the `common` buckets (missing ones are exported first, with random:0
weights when the directory has none). Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from interactive.bench.machine import cpu_flags, cpu_model

RSS_SCRIPT = """
import json, sys
import numpy as np
from interactive.runtime import Extractor
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
ex = Extractor.open(sys.argv[1], max_open_buckets=8)
out = []
for bucket in json.loads(sys.argv[2]):
    w, h = bucket
    image = np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    for _ in range(2):
        ex.backend.run((w, h), image)
    out.append(rss())
print(json.dumps(out))
"""


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up, not counted
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def engine_vs_reference(engine: Path, reps: int) -> dict:
    import torch

    from interactive.export.reference import reference_features
    from interactive.export.spec import FeatureSpec, load_state_dict
    from interactive.runtime import Extractor

    torch.set_num_threads(os.cpu_count() or 1)
    ex = Extractor.open(engine)
    m = ex.manifest.data
    spec = FeatureSpec(m["arch"], m["config"], m["p"], tuple(ex.layers), m["width_div"])
    sd = load_state_dict(m["weights"]["source"], m["arch"], m["width_div"])
    results = {}
    for batch in (1, 4):
        images = np.random.default_rng(batch).integers(0, 256, (batch, 512, 512, 3), np.uint8)
        ort_s = timed(lambda images=images: ex.backend.run((512, 512), images), reps)
        tensor = torch.from_numpy(images)
        ref_s = timed(lambda tensor=tensor: reference_features(spec, sd, tensor), reps)
        results[f"batch{batch}"] = {
            "ort_s_per_image": statistics.median(ort_s) / batch,
            "reference_s_per_image": statistics.median(ref_s) / batch,
            "ort_samples": ort_s,
            "reference_samples": ref_s,
        }
    return results


def disk_size(engine: Path) -> dict:
    files = {p.name: p.stat().st_size for p in engine.iterdir() if p.is_file()}
    graphs = [s for n, s in files.items() if n.endswith(".onnx")]
    return {
        "total_bytes": sum(files.values()),
        "weights_bytes": files.get("weights.bin", 0),
        "graphs": len(graphs),
        "graph_bytes_max": max(graphs, default=0),
    }


def rss_by_buckets(engine: Path, buckets: list[tuple[int, int]]) -> dict:
    command = [sys.executable, "-c", RSS_SCRIPT, str(engine)]
    one = json.loads(subprocess.check_output([*command, json.dumps(buckets[:1])]))
    four = json.loads(subprocess.check_output([*command, json.dumps(buckets[:4])]))
    return {
        "buckets": [f"{w}x{h}" for w, h in buckets[:4]],
        "rss_mb_one": one[-1],
        "rss_mb_after_each_of_four": four,
        "per_extra_bucket_mb": (four[-1] - one[-1]) / 3,
    }


def transposed_vs_flipped(reps: int) -> list[dict]:
    """One backward layer as ConvTranspose(W) and as Conv(flipped W^T), batch 1, fp32."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows = []
    for channels_in, channels_out, side in [(128, 128, 128), (256, 256, 64), (512, 512, 32)]:
        rng = np.random.default_rng(0)
        w = rng.standard_normal((channels_out, channels_in, 3, 3)).astype(np.float32)
        g = rng.standard_normal((1, channels_out, side, side)).astype(np.float32)
        flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        variants = {
            "conv_transpose": ("ConvTranspose", w),
            "conv_flipped": ("Conv", flipped),
        }
        timings, outputs = {}, {}
        for name, (op, kernel) in variants.items():
            node = helper.make_node(op, ["g", "w"], ["y"], pads=[1, 1, 1, 1])
            graph = helper.make_graph(
                [node],
                name,
                [helper.make_tensor_value_info("g", TensorProto.FLOAT, list(g.shape))],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                [numpy_helper.from_array(kernel, "w")],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
            session = ort.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
            outputs[name] = session.run(None, {"g": g})[0]
            feed = {"g": g}
            timings[name] = statistics.median(timed(lambda s=session, f=feed: s.run(None, f), reps))
        assert np.allclose(outputs["conv_transpose"], outputs["conv_flipped"], rtol=1e-3, atol=1e-3)
        rows.append({"shape": f"{channels_out}->{channels_in} @ {side}x{side}", **timings})
    return rows


def session_options_speed(engine: Path, reps: int) -> dict:
    """512x512, batch 1: the default OrtBackend against its two memory-for-speed options."""
    from interactive.runtime.backends import OrtBackend
    from interactive.runtime.manifest import EngineManifest

    manifest = EngineManifest.load(engine)
    image = np.random.default_rng(3).integers(0, 256, (1, 512, 512, 3), np.uint8)
    variants = {
        "default": {},
        "release_memory=False": {"release_memory": False},
        "prepack=True": {"prepack": True},
    }
    out = {}
    for name, options in variants.items():
        backend = OrtBackend(manifest, **options)
        out[name] = statistics.median(timed(lambda b=backend: b.run((512, 512), image), reps))
        backend.close()
    return out


def ensure_common(engine: Path) -> list[tuple[int, int]]:
    from interactive.export.exporter import ExportRequest, export_engine
    from interactive.runtime.buckets import common_buckets

    weights = "random:0"
    manifest_file = engine / "manifest.json"
    if manifest_file.exists():
        weights = json.loads(manifest_file.read_text())["export"]["weights"]
    export_engine(ExportRequest(out=engine, weights=weights, buckets="common"))
    return common_buckets()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", type=Path, default=Path("engines/vgg16-last-p2-random0"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    buckets = ensure_common(args.engine)
    result = {
        "date": date.today().isoformat(),
        "machine": {"cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count()},
        "command": " ".join(sys.argv),
        "engine": str(args.engine),
        "disk": disk_size(args.engine),
        "rss": rss_by_buckets(args.engine, buckets),
        "speed_512": engine_vs_reference(args.engine, args.reps),
        "transposed_vs_flipped": transposed_vs_flipped(args.reps),
        "session_options_512": session_options_speed(args.engine, args.reps),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"## Core engine, {r['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {', '.join(m['flags']) or 'none'}. "
        f"Command: `{r['command']}`. VGG-16 (random:0 weights), config `last`, p = 2, the "
        "paper's nine layers, fp32, ONNX Runtime CPU (all cores), torch eager (all cores).",
        "",
        "| 512x512 | ORT engine s/image | autograd reference s/image | speed-up |",
        "|---|---|---|---|",
    ]
    for batch, row in r["speed_512"].items():
        ratio = row["reference_s_per_image"] / row["ort_s_per_image"]
        lines.append(
            f"| {batch} | {row['ort_s_per_image']:.3f} | {row['reference_s_per_image']:.3f} "
            f"| {ratio:.2f}x |"
        )
    d = r["disk"]
    lines += [
        "",
        f"Engine directory, `common` buckets: {d['total_bytes'] / 1e6:.1f} MB in all: weights.bin "
        f"{d['weights_bytes'] / 1e6:.1f} MB + {d['graphs']} graphs of at most "
        f"{d['graph_bytes_max'] / 1024:.0f} KiB.",
        "",
    ]
    s = r["rss"]
    each = ", ".join(f"{x:.0f}" for x in s["rss_mb_after_each_of_four"])
    lines += [
        f"RSS (fresh process, each bucket run twice): one bucket open {s['rss_mb_one']:.0f} MB; "
        f"after each of four ({', '.join(s['buckets'])}): {each} MB; "
        f"{s['per_extra_bucket_mb']:.0f} MB per extra bucket.",
        "",
        "| backward layer (batch 1) | ConvTranspose s | Conv, flipped kernel s |",
        "|---|---|---|",
    ]
    for row in r["transposed_vs_flipped"]:
        lines.append(
            f"| {row['shape']} | {row['conv_transpose']:.4f} | {row['conv_flipped']:.4f} |"
        )
    o = r["session_options_512"]
    lines += [
        "",
        "OrtBackend options at 512x512, batch 1 (s): "
        + ", ".join(f"{name} {seconds:.3f}" for name, seconds in o.items())
        + ". `release_memory` hands freed activations back after each batch; `prepack` lets "
        "ORT copy the weights per session.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
