"""`pip install .` and `pip install -e .` both work, in a fresh venv without numpy or torch.

Each case copies the source tree into tmp_path (so the build writes its build/ and *.egg-info
there, not into the repository), makes a bare venv from the base interpreter, installs the
project with `pip install --no-deps` and then checks, from a neutral working directory, where
`interactive_features.runtime` and `interactive_features.export` are imported from and that
the `interactive` console script runs. The build itself uses pip's default build isolation:
the setuptools a venv ships (65.5 on Python 3.11) cannot build wheels without the separate
`wheel` package, so the isolated build environment fetches `setuptools>=64` (pyproject's build
requirement) instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# What a build needs: pyproject's package-dir maps each folder to its package;
# README.md is the project's `readme`.
SOURCE_FILES = ("pyproject.toml", "README.md")


def package_dirs() -> dict[str, str]:
    """Folder -> package path, from pyproject's package-dir (export -> <package>/export)."""
    with open(REPO / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {folder: package.replace(".", "/") for package, folder in mapping.items()}


PACKAGE_DIRS = package_dirs()


def python_sources_only(folder: str, names: list[str]) -> set[str]:
    """copytree's ignore: the Python modules, subpackages and Markdown only (engines/ also holds
    local engine artifacts)."""

    def kept(name: str) -> bool:
        path = Path(folder) / name
        package = path.is_dir() and (path / "__init__.py").is_file()
        return name.endswith((".py", ".md")) or package  # .md: package data (ALGORITHM.md)

    return {n for n in names if n == "__pycache__" or not kept(n)}


DROPPED_ENV = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "__PYVENV_LAUNCHER__")
PIP_TIMEOUT_S = 300
RUN_TIMEOUT_S = 60

# Run by the new venv's python: where things are imported from, without importing torch.
PROBE = """
import importlib.metadata, importlib.util, json, sysconfig
import interactive_features.runtime.buckets as buckets
import interactive_features.runtime.cli as cli
export = importlib.util.find_spec("interactive_features.export.exporter")
try:
    files = [f.as_posix() for f in importlib.metadata.files("interactive-features") or []]
except importlib.metadata.PackageNotFoundError:
    files = None
print(json.dumps({
    "purelib": sysconfig.get_paths()["purelib"],
    "scripts": sysconfig.get_paths()["scripts"],
    "buckets": buckets.__file__,
    "cli": cli.__file__,
    "export": export.origin if export else None,
    "files": files,
    "numpy": importlib.util.find_spec("numpy") is not None,
    "torch": importlib.util.find_spec("torch") is not None,
}))
"""


def clean_env() -> dict[str, str]:
    """The environment minus anything that would point the child at the dev venv."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def run(cmd: list[str | Path], cwd: Path, timeout: float = RUN_TIMEOUT_S) -> str:
    """Run `cmd`; on a non-zero exit fail with the command and its whole output."""
    args = [str(c) for c in cmd]
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout
        pytest.fail(f"timed out after {timeout} s: {' '.join(args)}\n--- output ---\n{out}")
    if proc.returncode != 0:
        pytest.fail(
            f"exit {proc.returncode}: {' '.join(args)} (cwd {cwd})\n--- output ---\n{proc.stdout}"
        )
    return proc.stdout


def base_python() -> str:
    """The interpreter the dev venv was made from, so the new venv sees none of its packages."""
    return getattr(sys, "_base_executable", None) or sys.executable


def copy_source(dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, dest / name)
    for name in PACKAGE_DIRS:
        if any(Path(name).is_relative_to(other) for other in PACKAGE_DIRS if other != name):
            continue  # a subpackage's folder (runtime/backends): copied with its parent's
        shutil.copytree(REPO / name, dest / name, ignore=python_sources_only)
    return dest


def is_inside(path: str | Path, folder: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_pip_install(tmp_path: Path, editable: bool) -> None:
    t0 = time.perf_counter()
    src = copy_source(tmp_path / "source")
    venv = tmp_path / "venv"
    run([base_python(), "-m", "venv", venv], cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    assert python.exists(), f"no interpreter at {python}"

    install = [python, "-m", "pip", "install", "--no-deps"]
    install += ["-e", src] if editable else [src]
    pip_out = run(install, cwd=tmp_path, timeout=PIP_TIMEOUT_S)

    def check(ok: bool, what: str) -> None:
        if not ok:
            pytest.fail(f"{what}\n--- pip output ---\n{pip_out}")

    if not editable:
        # The installed copy must not need the source tree any more.
        shutil.rmtree(src)
    else:
        # A module added after installing is importable without reinstalling.
        (src / "runtime" / "_editable_probe.py").write_text("VALUE = 42\n")

    info = json.loads(run([python, "-I", "-c", PROBE], cwd=tmp_path).strip().splitlines()[-1])
    check(not info["numpy"] and not info["torch"], f"the new venv is not bare: {info}")
    check(info["export"] is not None, "interactive_features.export.exporter is not findable")

    if editable:
        for key in ("buckets", "cli", "export"):
            check(is_inside(info[key], src), f"{key} comes from {info[key]}, not from {src}")
        check(
            not (Path(info["purelib"]) / "interactive_features").exists(),
            "an editable install copied interactive_features/ into site-packages",
        )
        probe = run(
            [
                python,
                "-I",
                "-c",
                "import interactive_features.runtime._editable_probe as m; print(m.VALUE)",
            ],
            cwd=tmp_path,
        )
        check(probe.strip() == "42", f"module added to the source tree: {probe!r}")
    else:
        for key in ("buckets", "cli", "export"):
            check(
                is_inside(info[key], info["purelib"]),
                f"{key} comes from {info[key]}, not from {info['purelib']}",
            )
        files = set(info["files"] or ())
        check(bool(files), "importlib.metadata.files('interactive-features') is empty")
        expected = {
            "interactive_features/runtime/cli.py",
            "interactive_features/export/graph.py",
            # package data: the math ships with the code
            "interactive_features/export/ALGORITHM.md",
        }
        for folder, package in PACKAGE_DIRS.items():
            for module in (REPO / folder).rglob("*.py"):
                relative = module.relative_to(REPO / folder)
                if "__pycache__" not in relative.parts:
                    expected.add(f"{package}/{relative.as_posix()}")
        missing = sorted(expected - files)
        check(not missing, f"installed files lack {missing}; they are {sorted(files)}")

    script = Path(info["scripts"]) / ("interactive.exe" if os.name == "nt" else "interactive")
    check(script.exists(), f"no console script at {script}")
    check(is_inside(script, venv), f"console script {script} is outside {venv}")
    help_out = run([script, "--help"], cwd=tmp_path)
    check("usage: interactive" in help_out, f"`interactive --help` printed:\n{help_out}")
    buckets_out = run([script, "buckets", "500x375"], cwd=tmp_path)
    check(
        buckets_out.strip() == "500x375 -> 576x448",
        f"`interactive buckets 500x375` printed:\n{buckets_out}",
    )
    mode = "editable" if editable else "regular"
    print(f"{mode} install checked in {time.perf_counter() - t0:.1f} s")
