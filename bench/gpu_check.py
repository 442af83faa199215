"""`make gpu-check` (or `python3 bench/gpu_check.py`): check the GPU code on a GPU, honestly.

Sized for a GPU host with Python, PyTorch (CUDA), cuda-python and no internet, within a total
budget of 6 minutes (`--budget`, default 360 s) split into per-step budgets (STEPS); each step
runs in its own process (bench/gpu_steps.py) and a step cut off by its budget still reports the
cases it finished:
1. install wheels: `--wheels DIR` (or $WHEELS) into a private folder, nothing fetched;
2. machine: versions, GPU, which backends can run here and why not;
3. engine: `--engine DIR`; when it holds a manifest but no weights.bin (`make gpu-check-engine`
   prepares such a folder, a few hundred KiB, to carry along), weights.bin is rebuilt from the
   manifest's random:SEED source and checked against its sha256; with no manifest at all the
   engine is exported there (full width, one bucket, minutes: avoid);
4. torch: the torch backend on CUDA, fp32/fp16/bf16 eager on every bucket and compiled on one,
   batches in an A-B-A order (3, 8, 3, 1), each call judged against the CPU autograd reference by
   runtime/conformance.py's one judge (bf16 and narrow-network fp16 heatmaps: reported, known);
5. plumbing: the TensorRT backend's pinned buffers, two streams, events and chunking through
   cuda.bindings on the GPU, with a device-to-device copy in TensorRT's place (reported as such);
6. tensorrt: `pytest -m tensorrt` over tests/test_tensorrt.py when TensorRT is installed;
7. benchmark: one process, CUDA events, torch eager and compiled at fp32/fp16/bf16 and batches
   1, 8, 32, 64 against the autograd reference (same TF32 setting): images/s, TFLOP/s (cost
   model) and the fraction of a measured 8192^3 matmul;
8. ONE results pair, gpu-check-DATE.md and .json, in `--out` (default $OUT, else bench/): every
   step's status (passed, failed, skipped with the reason), budget, seconds and cases.

Exit status 1 when a step failed or a `--require`d thing did not run (`--require
torch-cuda,cuda-plumbing,benchmark-cuda,tensorrt`), else 0. A step with nothing it could check is
skipped, never passed. `--dry-run` runs the same steps on the CPU with a narrow engine, tiny
batches and an emulated CUDA runtime for the plumbing (what CI runs); `--fail-step STEP` and
`--tolerance-scale` inject failures, to prove that the check can fail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def package_dirs() -> dict[str, str]:
    """Subpackage -> folder, from pyproject's package-dir (`<package>.export = export`)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {
        package.removeprefix("interactive_features."): folder for package, folder in mapping.items()
    }


# name -> seconds on the GPU host (sum: 360). Estimates for one H200 at full width, 512x512:
# rebuilding weights.bin (138 M random parameters, sha256 of 596 MB) ~15 s; the CPU reference of
# 15 images ~10 s, eager cases ~10 s, two torch.compile graphs (fp16, batches 4 and 8) ~40 s
# each; the benchmark: 8192^3 probes ~5 s, 14 eager cases ~30 s, then compiled cases while the
# budget lasts (each compiled case waits for `compile_s` left).
STEPS = {"machine": 30, "engine": 60, "torch": 150, "plumbing": 20, "tensorrt": 0,
         "benchmark": 100}  # fmt: skip
TENSORRT_BUDGET = 150  # taken from the benchmark's when TensorRT is here
REQUIRABLE = ("torch-cuda", "torch-cuda-compiled", "cuda-plumbing", "benchmark-cuda", "tensorrt",
              "torch-cpu", "host-plumbing", "benchmark-cpu")  # fmt: skip
TAIL = 4000  # characters of each step's output kept in the results


def device_config(args: argparse.Namespace) -> dict:
    """What each step runs: the GPU sizes, or --dry-run's tiny CPU ones."""
    dry = args.dry_run
    return {
        "device": "cpu" if dry else args.device,
        "engine": str(args.engine),
        "export": (
            {"weights": "random:0", "width_div": 8, "area": 224, "heatmaps": True}
            if dry
            else {"weights": "random:0", "heatmaps": False}
        ),
        "export_buckets": "224x224" if dry else "512x512",
        "precisions": args.precisions.split(","),
        "batches": [2, 1, 2] if dry else [3, 8, 3, 1],
        # torch.compile on the CPU costs ~35 s per graph: not in the dry run
        "compile_precisions": [] if dry else args.compile_precisions.split(","),
        "compile_s": 60,
        "bench_precisions": ["fp32"] if dry else args.precisions.split(","),
        "bench_batches": [1, 2] if dry else [1, 8, 32, 64],
        "reference_max_batch": 2 if dry else 8,
        "reps": 1 if dry else args.reps,
        "matmul_n": 256 if dry else None,
        "tolerance_scale": args.tolerance_scale,
        "fail": args.fail_step,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check = GpuCheck(args)
    try:
        check.run()
    finally:
        paths = check.write()
        print(f"\nwrote {paths[0]} and {paths[1]}", file=sys.stderr)
    for line in check.problems():
        print(f"gpu-check: {line}", file=sys.stderr)
    return 1 if check.problems() else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", type=Path, default=os.environ.get("WHEELS") or None,
                   help="folder of .whl files to install first (default $WHEELS)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench"))
    p.add_argument("--engine", type=Path, help="engine directory (default out/gpu-check-engine; "
                   "--dry-run: out/gpu-check-dry-engine)")  # fmt: skip
    p.add_argument("--budget", type=float, default=float(sum(STEPS.values())),
                   help="seconds for the whole check (and each step its own)")  # fmt: skip
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dry-run", action="store_true",
                   help="the same steps on the CPU, tiny sizes, a narrow engine (CI)")  # fmt: skip
    p.add_argument("--steps", default=",".join(STEPS), help="comma list of " + ", ".join(STEPS))
    p.add_argument("--require", default="",
                   help="comma list of what must have run: " + ", ".join(REQUIRABLE))  # fmt: skip
    p.add_argument("--compile-precisions", default="fp16",
                   help="precisions of the compiled torch cases (each one compiles)")  # fmt: skip
    p.add_argument("--precisions", default="fp32,fp16,bf16", help="torch precisions checked")
    p.add_argument("--reps", type=int, default=10, help="timed calls per benchmark case")
    p.add_argument("--fail-step", help="raise inside this step (proves a failure is reported)")
    p.add_argument("--tolerance-scale", type=float, default=1.0,
                   help="multiply every tolerance (e.g. 1e-9 to see the judge fail)")  # fmt: skip
    return p


class GpuCheck:
    def __init__(self, args: argparse.Namespace) -> None:
        if args.engine is None:
            name = "gpu-check-dry-engine" if args.dry_run else "gpu-check-engine"
            args.engine = ROOT / "out" / name
        self.args = args
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.steps: list[dict] = []
        self.facts: dict = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "dry_run": args.dry_run, "budget_s": args.budget}  # fmt: skip
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.config = device_config(args)
        self.wanted = [s for s in args.steps.split(",") if s]
        unknown = set(self.wanted) - set(STEPS)
        if unknown:
            raise SystemExit(f"--steps: unknown {sorted(unknown)}; expected {', '.join(STEPS)}")
        self.required = [r for r in args.require.split(",") if r]
        bad = set(self.required) - set(REQUIRABLE)
        if bad:
            raise SystemExit(f"--require: unknown {sorted(bad)}; expected {', '.join(REQUIRABLE)}")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self) -> None:
        self.install_wheels()
        self.link_package()
        for name in STEPS:
            if name not in self.wanted:
                continue
            if name == "tensorrt":
                self.tensorrt_step()
            elif name in ("torch", "benchmark", "plumbing") and self._engine_failed(name):
                continue
            else:
                self.step(name)
        machine = next((s for s in self.steps if s["name"] == "machine"), None)
        if machine and machine.get("details"):
            self.facts.update(machine["details"])

    def _engine_failed(self, name: str) -> bool:
        engine = next((s for s in self.steps if s["name"] == "engine"), None)
        if name != "plumbing" and engine is not None and engine["status"] != "passed":
            self.skip(name, "the engine step did not pass")
            return True
        return False

    # --- steps ---------------------------------------------------------------------------

    def step(self, name: str) -> dict:
        """Run step `name` in its own process within its budget and what is left."""
        budget = STEPS[name] * (0.5 if self.args.dry_run else 1.0)
        if name == "benchmark" and self._tensorrt_ran():
            budget = max(30.0, budget - TENSORRT_BUDGET)
        limit = min(budget, self.left())
        record: dict = {"name": name, "budget_s": round(budget), "seconds": 0.0, "ran": []}
        self.steps.append(record)
        if limit < 5:
            record.update(status="skipped", reason="the check's budget ran out")
            return record
        config = self.config | {"deadline": time.time() + limit - 3}
        command = [
            sys.executable,
            "-m",
            "interactive_features.bench.gpu_steps",
            name,
            json.dumps(config),
        ]
        print(f"== {name} (budget {limit:.0f} s)", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True,
                                  text=True, timeout=limit)  # fmt: skip
            stdout, output = done.stdout, done.stdout + done.stderr
            cut = None
        except subprocess.TimeoutExpired as err:
            stdout = _text(err.stdout)
            output = stdout + _text(err.stderr)
            cut = f"cut off by its budget after {limit:.0f} s"
        from_step, cases = _parse(stdout)
        record["seconds"] = round(time.monotonic() - started, 1)
        if from_step is None:
            from_step = {"status": "failed", "reason": cut or "the step died before reporting"}
        from_step.setdefault("cases", cases)
        if cut:
            from_step["cases"] = cases
        record.update({k: v for k, v in from_step.items()})
        record["output_tail"] = output[-TAIL:]
        print(f"   {record['status']}: {record.get('reason') or ''}", file=sys.stderr, flush=True)
        return record

    def _tensorrt_ran(self) -> bool:
        return any(s["name"] == "tensorrt" and s["status"] != "skipped" for s in self.steps)

    def tensorrt_step(self) -> None:
        machine = next((s for s in self.steps if s["name"] == "machine"), {})
        version = (machine.get("details") or {}).get("tensorrt")
        if not version:
            reason = (machine.get("details") or {}).get("tensorrt_reason", "no machine facts")
            self.skip("tensorrt", f"TensorRT is not here: {reason}")
            return
        limit = min(TENSORRT_BUDGET, self.left())
        command = [sys.executable, "-m", "pytest", "-q", "-m", "tensorrt", "-rs",
                   "-p", "no:cacheprovider", "tests/test_tensorrt.py"]  # fmt: skip
        record = {"name": "tensorrt", "budget_s": TENSORRT_BUDGET, "ran": [], "cases": []}
        self.steps.append(record)
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True,
                                  text=True, timeout=limit)  # fmt: skip
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as err:
            output, code = _text(err.stdout) + _text(err.stderr), None
        record["seconds"] = round(time.monotonic() - started, 1)
        passed = re.search(r"(\d+) passed", output)
        record["status"] = "passed" if code == 0 and passed else ("skipped" if code == 0
                                                                   else "failed")  # fmt: skip
        record["reason"] = _summary(output)
        record["ran"] = ["tensorrt"] if passed else []
        record["output_tail"] = output[-TAIL:]

    def skip(self, name: str, reason: str) -> None:
        self.steps.append({"name": name, "status": "skipped", "reason": reason, "seconds": 0.0,
                           "ran": []})  # fmt: skip

    def problems(self) -> list[str]:
        """Why the check fails: failed steps, and what --require wanted that did not run."""
        out = [f"step {s['name']} failed: {s.get('reason')}" for s in self.steps
               if s["status"] == "failed"]  # fmt: skip
        ran = {r for s in self.steps for r in s.get("ran", [])}
        out += [f"--require {r}: it did not run" for r in self.required if r not in ran]
        return out

    def install_wheels(self) -> None:
        wheels = sorted(self.args.wheels.glob("*.whl")) if self.args.wheels else []
        self.facts["wheels"] = [w.name for w in wheels]
        if not wheels:
            return
        site = self.work / "site"
        self._prepend_path(site)
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                   "--no-compile", "--target", str(site), *map(str, wheels)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        status = "passed" if done.returncode == 0 else "failed"
        self.steps.append({"name": "install wheels", "status": status, "seconds": 0.0, "ran": [],
                           "output_tail": (done.stdout + done.stderr)[-TAIL:]})  # fmt: skip

    def link_package(self) -> None:
        """`interactive_features.*` importable from this checkout without pip (no build, no net)."""
        shim = self.work / "shim"
        package = shim / "interactive_features"
        package.mkdir(parents=True)
        for (
            name,
            folder,
        ) in package_dirs().items():  # under one interactive_features/
            (package / name).symlink_to(ROOT / folder, target_is_directory=True)
        self._prepend_path(shim)

    def _prepend_path(self, folder: Path) -> None:
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(folder), *filter(None, [self.env.get("PYTHONPATH")])]
        )

    # --- the results file ------------------------------------------------------------------

    def write(self) -> tuple[Path, Path]:
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        stem = f"gpu-check-{'dry-' if self.args.dry_run else ''}{self.facts['created'][:10]}"
        self.facts["seconds"] = round(time.monotonic() - self.started, 1)
        self.facts["problems"] = self.problems()
        self.facts["required"] = self.required
        results = {**self.facts, "config": self.config, "steps": self.steps}
        json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
        json_path.write_text(json.dumps(results, indent=1, default=str))
        md_path.write_text(self.markdown(json_path))
        return md_path, json_path

    def markdown(self, json_path: Path) -> str:
        f = self.facts
        verdict = "FAILED" if f["problems"] else "passed"
        lines = [
            f"# GPU check {f['created']}{' (dry run on the CPU)' if f['dry_run'] else ''}: "
            f"{verdict}",
            "",
            f"GPU: {f.get('gpu')}; torch {f.get('torch')} (CUDA {f.get('cuda')}); onnxruntime "
            f"{f.get('onnxruntime')}; TensorRT {f.get('tensorrt')}; cuda-python "
            f"{f.get('cuda_bindings')}; Python {f.get('python')}. {f['seconds']:.0f} s of a "
            f"{f['budget_s']:.0f} s budget.",
            "",
            *[f"- **{p}**" for p in f["problems"]],
            "",
            "| step | status | ran | budget s | seconds | note |",
            "|---|---|---|---|---|---|",
        ]
        for s in self.steps:
            note = str(s.get("reason") or (s.get("details") or {}).get("note") or "")
            lines.append(f"| {s['name']} | {s['status']} | {', '.join(s.get('ran', []))} | "
                         f"{s.get('budget_s', '')} | {s['seconds']:.0f} | "
                         f"{note.replace('|', '/')[:200]} |")  # fmt: skip
        for s in self.steps:
            if s["name"] == "torch" and s.get("cases"):
                lines += [
                    "",
                    "## torch conformance",
                    "",
                    "| case | batch | call | status | verdict |",
                    "|---|---|---|---|---|",
                ]
                for c in s["cases"]:
                    text = c.get("known") or c.get("summary") or c.get("reason", "")
                    if c.get("repeat_ok") is not None:
                        text += f"; repeat {'same' if c['repeat_ok'] else 'DIFFERS'}"
                    lines.append(f"| {c['case']} | {c.get('batch', '')} | {c.get('call', '')} "
                                 f"| {c['status']} | {text} |")  # fmt: skip
            if s["name"] == "benchmark" and s.get("cases"):
                lines += ["", "## benchmark", "", "| case | status | images/s | TFLOP/s | "
                          "of matmul | vs reference |", "|---|---|---|---|---|---|"]  # fmt: skip
                for c in s["cases"]:
                    lines.append(f"| {c['case']} | {c['status']} | {_num(c.get('images_per_s'))}"
                                 f" | {_num(c.get('tflops'), 3)} | "
                                 f"{_num(c.get('matmul_fraction'), 2)} | "
                                 f"{_num(c.get('vs_reference'), 2)} |")  # fmt: skip
        lines += ["", f"Every step's cases and output tail: {json_path.name}.", ""]
        return "\n".join(lines)


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _parse(stdout: str) -> tuple[dict | None, list[dict]]:
    """The step's result line and case lines (bench/gpu_steps.py's prefixes)."""
    found, cases = None, []
    for line in stdout.splitlines():
        if line.startswith("GPU-CASE "):
            cases.append(json.loads(line[len("GPU-CASE ") :]))
        elif line.startswith("GPU-STEP-RESULT "):
            found = json.loads(line[len("GPU-STEP-RESULT ") :])
    return found, cases


def _summary(output: str) -> str:
    """pytest's last summary line, or the last line of other output."""
    rows = [ln.strip() for ln in output.splitlines() if ln.strip()]
    found = [ln for ln in rows if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    text = (found or rows or [""])[-1]
    return text.replace("|", "/")[:200]


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


if __name__ == "__main__":
    sys.exit(main())
