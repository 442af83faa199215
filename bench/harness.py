"""`interactive bench`: every backend against the peers, side by side, in one run.

    python -m interactive_features.bench --engine DIR [--backends available] [--peers ...]
                                         [--buckets ...]

A run is a list of cases (backend or peer x mode x bucket x batch x precision; bench/plan.py),
each timed in a fresh process (bench/measure.py, bench/worker.py). The parent then adds the cost
model, the measured matmul rate and every ratio between cases of this run (bench/stats.py),
judges every case's outputs against the run's own reference peer case (bench/judge.py), and
writes the JSON, the Markdown table (printed and appended to --results-md) and the plots
(bench/report.py).

Exit status 0 when every case ran or was skipped (a skip names its reason), 1 when a case failed
or a backend's outputs were beyond tolerance; a missed speed target is reported, and fails the
run only under --fail-on-target.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from datetime import datetime, timezone
from typing import Any

from interactive_features.bench.judge import add_conformance, nonconforming
from interactive_features.bench.machine import gpu_name, machine_info
from interactive_features.bench.measure import describe, measure, thread_env
from interactive_features.bench.plan import (
    ensure_direct_engine,
    ensure_forward_engine,
    matmul_case,
    plan_cases,
    profile_cases,
)
from interactive_features.bench.settings import build_parser, resolve_settings
from interactive_features.bench.stats import add_stats, costs
from interactive_features.runtime.manifest import EngineManifest

SCHEMA = "interactive-bench/1"


def main(argv: list[str] | None = None) -> int:
    from interactive_features.bench import report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.compare:
        runs = [json.loads(path.read_text()) for path in args.compare]
        print(report.compare(*runs))
        return 0
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    stem = f"bench-{created.replace(':', '').replace('-', '')[:15]}"
    run = run_benchmark(args, argv, created, stem)
    json_path = args.out / f"{stem}.json"
    if not args.no_plots:
        run["plots"] = [str(p) for p in report.plots(run, args.out, stem)]
    json_path.write_text(json.dumps(run, indent=1))
    text = report.markdown(run, json_path)
    print(text)
    results = args.results_md or args.out / "results.md"
    report.append(results, text)
    print(f"\nwrote {json_path}; appended to {results}", file=sys.stderr)
    return exit_status(run, fail_on_target=args.fail_on_target)


def exit_status(run: dict[str, Any], fail_on_target: bool = False) -> int:
    """1 (each reason on stderr) when a case failed or a backend did not conform, else 0. A
    missed speed target (stats.TARGETS) is reported on stderr, and fails the run only with
    `fail_on_target` (`--fail-on-target`): speed depends on the machine, correctness does not."""
    ran = [run["matmul"], *run["cases"], *run.get("profiles", [])]
    failed = [c for c in ran if c.get("status") == "failed"]
    bad = nonconforming(run)
    missed = [t for t in run.get("targets", []) if not t["met"]]
    for case in failed:
        print(f"failed: {describe(case)}: {case.get('reason')}", file=sys.stderr)
    for case in bad:
        print(f"beyond tolerance: {describe(case)}: {case['conformance']['summary']}",
              file=sys.stderr)  # fmt: skip
    for target in missed:
        verdict = "target missed" if fail_on_target else "target missed (not a failure)"
        print(f"{verdict}: case {target['case']}: {target['target']} ({target['ratio']} "
              f"{target['value']:.2f}, limit {target['limit']})", file=sys.stderr)  # fmt: skip
    return 1 if failed or bad or (fail_on_target and missed) else 0


def run_benchmark(
    args: argparse.Namespace, argv: list[str], created: str, stem: str
) -> dict[str, Any]:
    """Every case of the run, measured and judged; the returned dict is the run's JSON."""
    from interactive_features.bench.photos import bucket_inputs

    manifest = EngineManifest.load(args.engine)
    settings = resolve_settings(args, manifest)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    forward_engine = None
    if "engine-forward" in settings["peers"]:
        forward_engine = ensure_forward_engine(manifest, settings["buckets"], args.cache, log)
    settings["forward_engine"] = str(forward_engine) if forward_engine else None
    direct_engine = None
    if "engine-direct" in settings["peers"]:
        direct_engine = ensure_direct_engine(manifest, settings["buckets"], args.cache, log)
    settings["direct_engine"] = str(direct_engine) if direct_engine else None
    files = {}
    if "e2e" in settings["modes"]:
        inputs = args.out / "inputs"
        files = bucket_inputs(inputs, settings["buckets"], max(settings["batches"]), args.seed)
    outputs = args.out / f"{stem}-outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    run: dict[str, Any] = {
        "schema": SCHEMA,
        "created": created,
        "argv": argv,
        "command": shlex.join(["interactive", "bench", *argv]),
        "settings": settings,
        "machine": machine_info() | {"gpu": gpu_name() if args.device == "cuda" else None},
        "engine": {k: manifest.data[k] for k in ("arch", "width_div", "config", "p", "export")}
        | {"winograd": manifest.winograd},
    }
    run["cost"] = costs(manifest, settings["buckets"])
    cases = plan_cases(settings, manifest, forward_engine, files, outputs, direct_engine)
    env = thread_env(settings["threads"])
    probe = matmul_case(settings) | {"precisions": settings["precisions"]}
    matmul = measure(probe, env, args.timeout, log)
    run["matmul"] = {"device": settings["device"], **matmul}
    run["cases"] = [measure(case, env, args.timeout, log) for case in cases]
    if args.profile:
        run["profiles"] = [
            measure(case, env, args.timeout, log) for case in profile_cases(settings, cases)
        ]
    add_stats(run)
    add_conformance(run)
    # Judged: the outputs have served (they would pile up at a run's size per run).
    shutil.rmtree(outputs, ignore_errors=True)
    return run
