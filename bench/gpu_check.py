"""`make gpu-check` (or `python3 bench/gpu_check.py`): verify every GPU backend in one call.

On a machine with a CUDA GPU and PyTorch, from the repository root, within a time budget (default
570 s, under a 10-minute command limit):
1. installs the wheels of `--wheels DIR` (or $WHEELS), e.g. onnxruntime-gpu, tensorrt,
   cuda-python, into a private folder (pip --no-index --no-deps --target; nothing fetched);
2. makes the project importable without installing it (a folder of links named `interactive`);
3. says which backends can run here and why the others cannot (the registry's reasons);
4. exports the benchmark engine if it is missing (full-width VGG-16, config last, p = 2, the
   paper's nine layers, bucket 512x512, random:0 weights) and builds its TensorRT plans (fp32,
   fp16) when TensorRT is present;
5. runs the GPU cases of the conformance suite and of the TensorRT and ORT-GPU tests
   (`pytest -m "gpu or tensorrt" -rs`), whose skip lines say which backends did not run;
6. runs the GPU benchmark through `python -m interactive.bench`;
7. writes ONE results file pair, gpu-check-DATE.md and .json, into `--out` (default $OUT when
   set, else bench/), with every step's status, seconds and output tail.

Exit status 0 when every step that ran passed (skipped backends are not failures: the results
say which ran), 1 otherwise. Each step is cut off when the budget runs out, and the file still
says what was done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def package_dirs() -> dict[str, str]:
    """Subpackage -> folder, from pyproject's package-dir ("interactive.export" = "export")."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {package.removeprefix("interactive."): folder for package, folder in mapping.items()}


TEST_FILES = ["tests/test_conformance.py", "tests/test_tensorrt.py", "tests/test_ort_gpu.py"]
BENCH_BACKENDS = "ort-cuda,torch,tensorrt"
# fp16, not bf16: fp16 conforms to export/ALGORITHM.md's tolerance, bf16 does not (README,
# torch backend).
BENCH_PRECISIONS = ("fp32", "fp16")
BUCKET = "512x512"
TAIL = 6000  # characters of each step's output kept in the results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check = GpuCheck(args)
    try:
        check.run()
    finally:
        paths = check.write()
        print(f"\nwrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0 if all(s["status"] in ("passed", "skipped") for s in check.steps) else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", type=Path, default=os.environ.get("WHEELS") or None,
                   help="folder of .whl files to install first (default $WHEELS)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench"))
    p.add_argument("--engine", type=Path, default=ROOT / "out" / "gpu-check-engine")
    p.add_argument("--budget", type=float, default=570.0, help="seconds for the whole check")
    p.add_argument("--reps", type=int, default=10, help="timed calls per benchmark case")
    p.add_argument("--skip-bench", action="store_true")
    return p


class GpuCheck:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.steps: list[dict] = []
        self.facts: dict = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.bench_md = self.work / "bench.md"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self) -> None:
        self.install_wheels()
        self.link_package()
        self.describe_machine()
        self.prepare_engine()
        self.step("conformance", [sys.executable, "-m", "pytest", "-q", "-m", "gpu or tensorrt",
                                  "-rs", "-p", "no:cacheprovider", *TEST_FILES],  # fmt: skip
                  reserve=0 if self.args.skip_bench else 240)  # fmt: skip
        if self.args.skip_bench:
            self.skip("benchmark", "--skip-bench")
        else:
            self.step("benchmark", self.bench_command())

    # --- steps ---------------------------------------------------------------------------

    def step(self, name: str, command: list[str], reserve: float = 20.0) -> dict:
        """Run `command` with what is left of the budget (minus `reserve` for later steps)."""
        limit = self.left() - reserve
        record = {"name": name, "command": shlex.join(command), "seconds": 0.0}
        self.steps.append(record)
        if limit < 10:
            record.update(status="skipped", reason="the time budget ran out")
            return record
        shown = record["command"] if "-c" not in command else f"{command[0]} -c ..."
        print(f"== {name}: {shown}", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True,
                                  text=True, timeout=limit)  # fmt: skip
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as err:
            output = _text(err.stdout) + _text(err.stderr) + f"\n(cut off after {limit:.0f} s)"
            code = None
        record["seconds"] = round(time.monotonic() - started, 1)
        record["status"] = "passed" if code == 0 else "failed"
        record["exit_code"] = code
        record["output_tail"] = output[-TAIL:]
        print(output[-2000:], file=sys.stderr, flush=True)
        return record

    def skip(self, name: str, reason: str) -> None:
        self.steps.append({"name": name, "status": "skipped", "reason": reason, "seconds": 0.0})

    def install_wheels(self) -> None:
        wheels = sorted(self.args.wheels.glob("*.whl")) if self.args.wheels else []
        self.facts["wheels"] = [w.name for w in wheels]
        if not wheels:
            self.skip("install wheels", "no --wheels/WHEELS folder with .whl files: backends "
                      "whose packages this machine lacks are skipped below")  # fmt: skip
            return
        site = self.work / "site"
        self._prepend_path(site)
        self.step("install wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                     "--no-deps", "--no-compile", "--target", str(site),
                                     *map(str, wheels)])  # fmt: skip

    def link_package(self) -> None:
        """`interactive.*` importable from this checkout without pip (no build, no network)."""
        shim = self.work / "shim"
        package = shim / "interactive"
        package.mkdir(parents=True)
        for name, folder in package_dirs().items():  # linked under one `interactive` folder
            (package / name).symlink_to(ROOT / folder, target_is_directory=True)
        self._prepend_path(shim)

    def _prepend_path(self, folder: Path) -> None:
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(folder), *filter(None, [self.env.get("PYTHONPATH")])]
        )

    def describe_machine(self) -> None:
        probe = (
            "import json, torch, onnxruntime\n"
            "from interactive.runtime.backends import available_backends\n"
            "facts = {'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
            "  'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,\n"
            "  'onnxruntime': onnxruntime.__version__,\n"
            "  'ort_providers': onnxruntime.get_available_providers(),\n"
            "  'backends': available_backends()}\n"
            "try:\n"
            "    import tensorrt; facts['tensorrt'] = getattr(tensorrt, '__version__', None)\n"
            "except ImportError: facts['tensorrt'] = None\n"
            "print('FACTS' + json.dumps(facts))\n"
        )
        record = self.step("machine and backends", [sys.executable, "-c", probe])
        found = re.search(r"FACTS(\{.*\})", record.get("output_tail", ""))
        if found:
            self.facts.update(json.loads(found.group(1)))
        self.facts["python"] = platform.python_version()
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"]
        try:
            smi = subprocess.run(query, capture_output=True, text=True, timeout=30)
            self.facts["nvidia_smi"] = (smi.stdout + smi.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            self.facts["nvidia_smi"] = f"nvidia-smi: {err}"

    def prepare_engine(self) -> None:
        engine = self.args.engine
        if not (engine / f"bucket-{BUCKET}.onnx").exists():
            self.step("export engine", [sys.executable, "-m", "interactive.runtime.cli", "export",
                                        "--out", str(engine), "--weights", "random:0",
                                        "--buckets", BUCKET])  # fmt: skip
        backends = self.facts.get("backends") or {"tensorrt": "the machine probe failed"}
        if backends.get("tensorrt") is None:  # TensorRT and a GPU are here: plans for the bench
            for precision in BENCH_PRECISIONS:
                self.step(f"build tensorrt {precision}", [
                    sys.executable, "-m", "interactive.runtime.cli", "build", "--engine",
                    str(engine), "--backend", "tensorrt", "--precision", precision,
                    "--buckets", BUCKET, "--max-batch", "8"], reserve=300)  # fmt: skip
        else:
            self.skip("build tensorrt", str(backends.get("tensorrt")))

    def bench_command(self) -> list[str]:
        if not (ROOT / "bench" / "harness.py").exists():
            return [sys.executable, "-c", "raise SystemExit('the bench harness is missing')"]
        return [
            sys.executable, "-m", "interactive.bench", "--engine", str(self.args.engine),
            "--backends", BENCH_BACKENDS, "--precision", ",".join(BENCH_PRECISIONS),
            "--device", "cuda", "--buckets", BUCKET, "--batch", "1,8", "--peers", "reference",
            "--reps", str(self.args.reps), "--out", str(self.work / "bench"),
            "--results-md", str(self.bench_md), "--no-plots",
        ]  # fmt: skip

    # --- the results file ------------------------------------------------------------------

    def write(self) -> tuple[Path, Path]:
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        stem = f"gpu-check-{self.facts['created'][:10]}"
        self.facts["seconds"] = round(time.monotonic() - self.started, 1)
        bench_runs = sorted((self.work / "bench").glob("*.json"))
        results = {
            **self.facts,
            "steps": self.steps,
            "bench": json.loads(bench_runs[-1].read_text()) if bench_runs else None,
        }
        json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
        json_path.write_text(json.dumps(results, indent=1, default=str))
        md_path.write_text(self.markdown(json_path))
        return md_path, json_path

    def markdown(self, json_path: Path) -> str:
        f = self.facts
        lines = [
            f"# GPU check {f['created']}",
            "",
            f"GPU: {f.get('gpu') or f.get('nvidia_smi')}; torch {f.get('torch')} (CUDA "
            f"{f.get('cuda')}); onnxruntime {f.get('onnxruntime')} {f.get('ort_providers')}; "
            f"TensorRT {f.get('tensorrt')}; Python {f.get('python')}; wheels given: "
            f"{', '.join(f.get('wheels') or []) or 'none'}. {f['seconds']:.0f} s in all.",
            "",
            "| backend | runs here? |",
            "|---|---|",
            *[
                f"| {k} | {'yes' if v is None else v} |"
                for k, v in (f.get("backends") or {}).items()
            ],
            "",
            "| step | status | seconds | note |",
            "|---|---|---|---|",
        ]
        for s in self.steps:
            note = s.get("reason") or _summary(s.get("output_tail", ""))
            lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {note} |")
        for s in self.steps:
            if s.get("name") == "conformance" and s.get("output_tail"):
                skips = [ln for ln in s["output_tail"].splitlines() if ln.startswith("SKIPPED")]
                lines += ["", "## Conformance: skipped cases", "", *[f"- {ln}" for ln in skips]]
        if self.bench_md.exists():
            lines += ["", "## Benchmark", "", self.bench_md.read_text()]
        lines += ["", f"Every step's command and output tail: {json_path.name}.", ""]
        return "\n".join(lines)


def _summary(output: str) -> str:
    """pytest's last summary line, or the last line of other output."""
    rows = [ln.strip() for ln in output.splitlines() if ln.strip() and "FACTS{" not in ln]
    found = [ln for ln in rows if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    text = (found or rows or [""])[-1]
    return text.replace("|", "/")[:200]


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


if __name__ == "__main__":
    sys.exit(main())
