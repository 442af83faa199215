"""The conformance column: every case's outputs judged against the autograd reference of the run.

Each backend or peer case that runs saves its last call's outputs (bench/worker.py). A case is
judged with runtime/conformance.py's conformance_report, at its own precision, against
the fp32 peer case that computes the same features from the same inputs (same mode, bucket,
batch and device: such cases share their seed and files): the `reference` peer for InterActive
cases, the `torch-forward` peer for forward-only ones. No extra reference run is made: without
that peer case in the run, a case is "not judged". Peers that compute no heatmaps (naive,
captum) are judged on the outputs they have.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from interactive_features.runtime.conformance import conformance_report

REFERENCE_PEER = {"interactive": "reference", "forward": "torch-forward", "direct": "reference"}
# The direct-convolution twin computes the InterActive outputs: judged against `reference`.
OUTPUTS_OF = {"direct": "interactive"}


def reference_key(case: dict[str, Any]) -> tuple[Any, ...]:
    variant = OUTPUTS_OF.get(case["variant"], case["variant"])
    return (case["mode"], tuple(case["bucket"]), case["batch"], case["device"], variant)


def load_outputs(case: dict[str, Any]) -> dict[str, np.ndarray]:
    with np.load(case["outputs_file"]) as saved:
        return {name: saved[name] for name in saved.files}


def add_conformance(run: dict[str, Any]) -> None:
    """case["conformance"] for every case that ran: ok (True, False, or None when not judged),
    the worst relative error over its outputs, the report's summary and the reference's id."""
    ran = [c for c in run["cases"] if c.get("status") == "ok" and c.get("outputs_file")]
    references = {
        reference_key(c): c
        for c in ran
        if c["kind"] == "peer"
        and c["precision"] == "fp32"
        and c["peer"] == REFERENCE_PEER[c["variant"]]
    }
    for case in ran:
        reference = references.get(reference_key(case))
        if reference is None:
            peer = REFERENCE_PEER[case["variant"]]
            case["conformance"] = {
                "ok": None,
                "verdict": "not judged",
                "reason": f"no fp32 {peer} peer case for the same inputs in this run",
            }
        elif reference is case:
            case["conformance"] = {"ok": None, "verdict": "reference"}
        else:
            case["conformance"] = judge(case, reference)


def judge(case: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    got, want = load_outputs(case), load_outputs(reference)
    if case["kind"] == "peer":  # a peer is judged on the outputs it computes
        want = {name: value for name, value in want.items() if name in got}
    try:
        report = conformance_report(got, want, case["precision"], label=str(case["id"]))
    except AssertionError as err:  # a missing output or a wrong shape or dtype
        return {"ok": False, "verdict": "FAIL", "against": reference["id"], "summary": str(err)}
    worst = max((c.rel_err for c in report.checks), default=0.0)
    return {
        "ok": report.ok,
        "verdict": "ok" if report.ok else "FAIL",
        "against": reference["id"],
        "worst_error": worst,
        "worst_feature_error": report.max_feature_error,
        "errors": report.errors,
        "summary": report.summary(),
    }


def conformance_text(case: dict[str, Any]) -> str:
    """The Markdown cell: "ok 3.1e-05", "FAIL 2.1e-02", "reference" or "not judged"."""
    verdict = case.get("conformance")
    if verdict is None:
        return "-"
    if "worst_error" in verdict:
        return f"{verdict['verdict']} {verdict['worst_error']:.1e}"
    return str(verdict["verdict"])


def nonconforming(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The backend cases judged beyond tolerance (peers are measured, not gated)."""
    judged = [c for c in run["cases"] if c["kind"] == "backend" and "conformance" in c]
    return [c for c in judged if c["conformance"]["ok"] is False]
