"""The README's walkthrough from an index OUTDIR to a kNN index built by autofaiss, run as written.

autofaiss pins numpy<2 (and pyarrow 21+ needs numpy 2), so it cannot share this project's venv:
the walkthrough makes a venv of its own. This test runs the README's three commands (the index
on the narrow engine, which has the Quickstart smoke engine's settings; the venv; autofaiss
build_index) on the bundled photos plus a broken file, then searches the index with that venv's
faiss: failed rows never reach autofaiss, and each photo's nearest neighbour is itself. Needs
PyPI (as the install does); about a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_readme import ROOT, shell_commands

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SEARCH = """
import json, sys, faiss, numpy as np, pyarrow.parquet as pq
index = faiss.read_index("knn/knn.index")
table = pq.read_table("index/part-00000.parquet")
vectors = np.stack(table["features"].to_numpy(zero_copy_only=False)).astype("float32")
scores, rows = index.search(vectors, 2)
print(json.dumps({"ntotal": index.ntotal, "d": index.d, "nearest": rows[:, 0].tolist()}))
"""


def walkthrough() -> list[str]:
    """The README's commands from the index to autofaiss, in order."""
    start = next(i for i, c in enumerate(shell_commands()) if c.startswith("python3 -m venv"))
    commands = shell_commands()[start - 1 : start + 3]
    assert commands[0].startswith("interactive index tests/data --engine engines/smoke")
    assert commands[-1].startswith("autofaiss-venv/bin/autofaiss build_index")
    return commands


def test_autofaiss_builds_an_index_from_the_outdir(narrow_engine: Path, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "tests" / "data", tmp_path / "tests" / "data")
    (tmp_path / "tests" / "data" / "broken.jpg").write_bytes(b"not a jpeg")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    for command in walkthrough():
        command = command.replace("engines/smoke", str(narrow_engine))
        result = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True
        )
        # 3: the index exits "partial" for the broken file; everything else must succeed.
        assert result.returncode in ((0, 3) if command.startswith("interactive") else (0,)), (
            command,
            result.stderr[-3000:],
        )
    ok = pq.read_table(tmp_path / "index" / "part-00000.parquet")
    assert pq.read_table(tmp_path / "index" / "_errors")["status"].to_pylist() != []
    python = tmp_path / "autofaiss-venv" / "bin" / "python"
    found = json.loads(
        subprocess.run(
            [str(python), "-c", SEARCH], cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout
    )
    assert found["ntotal"] == ok.num_rows == len(list((ROOT / "tests" / "data").glob("*.jpg")))
    assert found["d"] == len(ok["features"][0])
    assert found["nearest"] == list(range(ok.num_rows))
