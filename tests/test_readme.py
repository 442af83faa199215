"""README.md stays true: its command table lists every flag, and every command in its code blocks
is run (the cheap ones, with the narrow settings the README itself uses) or parsed by the real
parser (the expensive ones: full-width exports, benchmarks, Ray clusters, GPU checks).

Run for real (about 45 s on 2 cores): the Quickstart's smoke run (export of the 1/8-width network
at area 256, extract of tests/data/*.jpg: exit 0), the "Indexing a collection" commands on that
engine and the bundled photos, `make run`'s script (export/quickstart.py) on that engine, and the
Python API block on the narrow test engine. Parsed only: the full-width export and extract, the
Ray, build and bench commands (`parse_args` of the real parsers, bench's own included),
`python3 bench/gpu_check.py` (its parser), and every `make` target (`make -n`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from interactive_features.bench.settings import build_parser as bench_parser
from interactive_features.runtime.cli import build_parser

from conftest import photos

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
# The autofaiss walkthrough's venv commands are run by tests/test_autofaiss.py.
AUTOFAISS = ("autofaiss-venv/bin/pip", "autofaiss-venv/bin/autofaiss")
PROGRAMS = {"interactive", "make", "pip", "python3", "ray", ".", *AUTOFAISS}
# The commands run for real (all others are parsed), by the text they start with.
SMOKE = (
    "interactive export --weights random:0 --width-div 8",
    "interactive extract --engine engines/smoke",
)
INDEX = "interactive index photos/ --engine engines/vgg16-last-p2 -o index/ --d"
INDEX_RUN = "interactive index photos/ --engine engines/vgg16-last-p2 -o index/ --w"


def code_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block of README.md (indented ones too)."""
    fence = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
    return [(m.group(2), m.group(3)) for m in fence.finditer(README)]


def shell_commands() -> list[str]:
    """Every command line of the sh/bash blocks: continuations joined, comments dropped, `&&`
    split, `[optional parts]` removed."""
    commands = []
    for language, text in code_blocks():
        if language not in ("sh", "bash"):
            continue
        for line in text.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for part in " ".join(_quote(w) for w in words).split(" '&&' "):
                if part.strip():
                    commands.append(part.strip())
    return commands


def _quote(word: str) -> str:
    """Quoted for the shell, but for globs (`tests/data/*.jpg`), which the shell expands."""
    return word if re.fullmatch(r"[\w./*:,=+@-]+", word) else shlex.quote(word)


def without_optional(words: list[str]) -> list[str]:
    out, depth = [], 0
    for w in words:
        depth += w.startswith("[")
        if not depth:
            out.append(w)
        depth -= w.endswith("]") and depth > 0
    return out


def interactive_args(command: str) -> list[str] | None:
    """The arguments of an `interactive ...` command (also inside `ray job submit -- ...`)."""
    words = without_optional(shlex.split(command))
    if words[0] == "ray" and "--" in words:
        words = words[words.index("--") + 1 :]
    return words[1:] if words[0] == "interactive" else None


def test_every_block_is_covered() -> None:
    languages = {language for language, _ in code_blocks()}
    assert languages <= {"sh", "bash", "python", ""}, languages
    programs = {shlex.split(c)[0] for c in shell_commands()}
    assert programs <= PROGRAMS, f"a README command this test does not know: {programs}"
    assert any(c.startswith(SMOKE[0]) for c in shell_commands())  # the quickstart is still here


def _parse(args: list[str]) -> argparse.Namespace:
    if args[0] == "bench":
        return bench_parser().parse_args(args[1:])
    return build_parser().parse_args(args)


@pytest.mark.parametrize("command", [c for c in shell_commands() if interactive_args(c)])
def test_every_interactive_command_parses(command: str) -> None:
    args = interactive_args(command)
    assert args
    try:
        _parse(args)
    except SystemExit as exit:  # argparse's usage error
        pytest.fail(f"{command!r} does not parse (exit {exit.code})")


def test_make_targets_and_scripts_parse() -> None:
    for command in shell_commands():
        words = without_optional(shlex.split(command))
        if words[0] == "make":
            result = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True)
            assert result.returncode == 0, (command, result.stderr)
        elif words[0] == "python3" and words[1] != "-m":  # `-m`: a module (venv, bench.winograd)
            script = ROOT / words[1]
            spec = importlib.util.spec_from_file_location("readme_script", script)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module._parser().parse_args(words[2:])


def test_pip_commands_name_this_project() -> None:
    """Every `pip install` of the README names a pin the Makefile uses, this project (`.` or its
    distribution name) with extras pyproject defines, or a package the README explains; never the
    unrelated PyPI `interactive`."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    extras, makefile = set(project["optional-dependencies"]), (ROOT / "Makefile").read_text()
    for command in shell_commands():
        words = shlex.split(command)
        if words[0] != "pip":
            continue
        assert words[1] == "install", command
        for target in (w for w in words[2:] if not w.startswith("-")):
            name, _, rest = target.partition("[")
            if name in (".", project["name"]):
                assert set(filter(None, rest.rstrip("]").split(","))) <= extras, command
            elif "==" in name:
                assert name in makefile, f"{command}: the Makefile pins another version"
            else:
                assert name not in ("interactive", "Interactive"), command
                assert f"`{name}`" in README, f"{command}: {name} is not explained"


def test_quickstart_and_index_commands_run(tmp_path: Path) -> None:
    """The Quickstart's smoke run exits 0 (every photo has its bucket), then the index commands
    run on that engine with the bundled photos as `photos/`."""
    (tmp_path / "tests").mkdir()
    shutil.copytree(ROOT / "tests" / "data", tmp_path / "tests" / "data")
    shutil.copytree(ROOT / "tests" / "data", tmp_path / "photos")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    commands = [c for c in shell_commands() if c.startswith(SMOKE)]
    assert len(commands) == 2
    index = [c for c in shell_commands() if c.startswith((INDEX, INDEX_RUN))]
    assert len(index) == 2
    for command in commands + [c.replace("engines/vgg16-last-p2", "engines/smoke") for c in index]:
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True)
        assert result.returncode == 0, (command, result.stderr.decode()[-2000:])
    assert (tmp_path / "smoke.parquet").is_file()
    # `make run`'s script on the same engine (its buckets are there: nothing is exported again).
    quickstart = [sys.executable, "-m", "interactive_features.export.quickstart", "tests/data",
                  "--out", "q", "--engine", "engines/smoke", "--weights", "random:0",
                  "--width-div", "8", "--area", "256"]  # fmt: skip
    result = subprocess.run(quickstart, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RANDOM weights (random:0)" in result.stderr
    assert (tmp_path / "q" / "features.parquet").is_file()
    assert sorted(p.name for p in (tmp_path / "index").glob("part-*.parquet"))


def test_python_api_block_runs(narrow_engine: Path) -> None:
    """The Python API block on the narrow test engine (it has heatmaps), with the photos."""
    (block,) = [text for language, text in code_blocks() if language == "python"]
    code = block.replace('"engines/vgg16-last-p2"', repr(str(narrow_engine)))
    namespace = {"images": [str(p) for p in photos()], "i": 0}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["feats"].errors == {}


def _table_rows() -> list[list[str]]:
    """The cells of the "Command line" table; fails when the table does not render (a blank or
    stray line inside it, a row with the wrong number of cells)."""
    section = README.split("## Command line\n", 1)[1]
    lines = section.lstrip("\n").splitlines()
    assert lines[0] == "| command | what it does |" and lines[1] == "|---|---|"
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            assert line == "", f"the table must end with a blank line, not {line!r}"
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)]
        assert cells[0] == cells[-1] == "" and len(cells) == 4, f"a row of 2 cells: {line!r}"
        rows.append(cells[1:3])
    return rows


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = dict(sub.choices)
    for name, child in list(parsers.items()):  # `knn build`: a command with sub-commands
        for nested in [a for a in child._actions if isinstance(a, argparse._SubParsersAction)]:
            del parsers[name]
            parsers.update({f"{name} {leaf}": p for leaf, p in nested.choices.items()})
    parsers["bench"] = bench_parser()
    parsers[""] = parser
    return parsers


def test_command_table_lists_every_flag() -> None:
    rows = _table_rows()
    usage = {}
    for command, _ in rows:
        words = command.strip("`").split()
        assert words[0] == "interactive"
        name = "" if words[1].startswith("[") else words[1]
        if name == "knn":
            name = " ".join(words[1:3])
        usage[name] = command
    parsers = _subcommands()
    assert set(usage) == set(parsers), "a row per command"
    for name, parser in parsers.items():
        flags = re.findall(r"(?<![\w-])(-{1,2}[a-z][\w-]*)", usage[name])
        for action in parser._actions:
            if action.dest == "help" or (action.dest == "log_level" and name):
                continue
            spellings = action.option_strings
            assert not spellings or set(spellings) & set(flags), (
                f"`interactive {name}` flag {'/'.join(spellings)} missing from README's table"
            )
        known = {f for a in parser._actions for f in a.option_strings}
        assert set(flags) <= known | {"-h", "--help"}, f"{name}: {set(flags) - known}"
