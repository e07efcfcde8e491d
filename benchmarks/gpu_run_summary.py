"""The end of a GPU run's log.txt: each step's verdict, the tests' counts and failures (from their JUnit
XML), providers whose results disagreed with the reference, and the headline speedups; or, with
``--kernels``, the kernel report of the warm step as markdown.

    python benchmarks/gpu_run_summary.py OUTDIR --status STEPS.tsv --junit LOGDIR
    python benchmarks/gpu_run_summary.py OUTDIR --kernels kernels.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET


def steps(path: str) -> list[str]:
    lines = ["| step | verdict | seconds |", "|---|---|---|"]
    with open(path) as f:
        for row in f:
            name, verdict, took, _ = row.rstrip("\n").split("\t")
            lines.append(f"| {name} | {verdict} | {took} |")
    return lines


def junit(logdir: str) -> list[str]:
    lines = []
    for path in sorted(glob.glob(os.path.join(logdir, "*.xml"))):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as exc:
            lines.append(f"{os.path.basename(path)}: unreadable ({exc})")
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        lines.append(f"{os.path.basename(path)[:-4]}: {passed} passed, {n['failures']} failed, {n['errors']} errors, "
                     f"{n['skipped']} skipped")
        bad = [c for c in root.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
        for case in bad[:25]:
            what = case.find("failure") if case.find("failure") is not None else case.find("error")
            message = (what.get("message") or "").splitlines()[0][:160] if what is not None else ""
            lines.append(f"  FAILED {case.get('classname', '')}::{case.get('name')}: {message}")
        if len(bad) > 25:
            lines.append(f"  ... and {len(bad) - 25} more")
    return lines


def speedups(results: str) -> list[str]:
    if not os.path.exists(results):
        return ["no benchmark results"]
    with open(results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    lines = []
    wrong = [r for r in rows if r.get("check", "ok") != "ok"]
    for r in wrong:
        lines.append(f"WRONG RESULT {r['case']} {r['mode']} {r['dtype']} {r['format']} {r['provider']}: {r['check']}")
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["provider"] != "eager":
            groups.setdefault((r["case"], r["mode"], r["dtype"], r["format"]), {})[r["provider"]] = r["speedup_vs_eager"]
    providers = sorted({p for g in groups.values() for p in g})
    lines += ["", "Speedup over eager (same run; above 1 is faster):", "",
              "| case | mode | dtype | format | " + " | ".join(providers) + " |",
              "|---|---|---|---|" + "---|" * len(providers)]
    for (case, mode, dtype, fmt), g in groups.items():
        cells = [f"{g[p]:.2f}x" if p in g else "" for p in providers]
        lines.append(f"| {case} | {mode} | {dtype} | {fmt} | " + " | ".join(cells) + " |")
    return lines


def kernels(path: str) -> list[str]:
    with open(path) as f:
        data = json.load(f)
    out = [f"Triton {data['triton']} kernel variants compiled for sm_{data['arch']} (the warm step):", "",
           "| " + " | ".join(data["columns"]) + " |", "|" + "---|" * len(data["columns"])]
    out += ["| " + " | ".join(r) + " |" for r in data["rows"]]
    if data.get("extension_rows"):
        out += ["", f"CUDA extension, sm_{data['arch']}:", "",
                "| " + " | ".join(data["extension_columns"]) + " |", "|" + "---|" * len(data["extension_columns"])]
        out += ["| " + " | ".join(r) + " |" for r in data["extension_rows"]]
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--status")
    parser.add_argument("--junit")
    parser.add_argument("--kernels")
    args = parser.parse_args()
    if args.kernels:
        print("\n".join(kernels(args.kernels)))
        return 0
    lines = ["", "=" * 30 + " summary " + "=" * 30, ""]
    if args.status:
        lines += steps(args.status) + [""]
    if args.junit:
        lines += junit(args.junit) + [""]
    lines += speedups(os.path.join(args.out, "results.jsonl"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
