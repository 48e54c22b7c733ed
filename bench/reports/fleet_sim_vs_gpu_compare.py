"""The sim-vs-GPU check of issue 10: a sim fleet.json against the 4-worker H200 doc-QA run, per router.

    python bench/reports/fleet_sim_vs_gpu_compare.py SIM_DIR/fleet.json OUT.md [--label TEXT] [--gpu GPU.md|GPU.json]

GPU figures: the table of bench/reports/fleet_gpu_docqa_h200.md (default; its first "| router | req/s | hit rate"
table), or a fleet.json of a GPU run. Writes OUT.md: req/s and hit rate per router, sim / GPU, and whether
each is within 15% (the issue's bar), with the label, the sim run's setup and the profile's fit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPORTS = Path(__file__).resolve().parent
GPU_REPORT = REPORTS / "fleet_gpu_docqa_h200.md"
TOLERANCE = 0.15
ROW = re.compile(r"^\|\s*([\w./-]+)\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)%\s*\|")


def gpu_rows(path: Path) -> dict[str, dict]:
    """router -> {"req_s", "hit_rate"} from a GPU fleet.json or the markdown report's first table."""
    if path.suffix == ".json":
        return {r["router"]: {"req_s": r["req_s"], "hit_rate": r["hit_rate"]} for r in json.loads(path.read_text())["rows"]}
    rows: dict[str, dict] = {}
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| router | req/s | hit rate")), None)
    if start is None:
        raise ValueError(f"{path} has no '| router | req/s | hit rate' table")
    for line in lines[start + 2:]:
        match = ROW.match(line)
        if not match:
            break
        rows[match.group(1)] = {"req_s": float(match.group(2)), "hit_rate": float(match.group(3)) / 100}
    return rows


def within(ratio: float) -> str:
    return "yes" if abs(ratio - 1) <= TOLERANCE else "**no**"


def compare(sim: dict, gpu: dict[str, dict]) -> list[dict]:
    out = []
    for row in sim["rows"]:
        reference = gpu.get(row["router"])
        if reference is None:
            continue
        out.append({"router": row["router"], "gpu_req_s": reference["req_s"], "sim_req_s": row["req_s"],
                    "req_s_ratio": row["req_s"] / reference["req_s"], "gpu_hit_rate": reference["hit_rate"],
                    "sim_hit_rate": row["hit_rate"], "hit_rate_ratio": row["hit_rate"] / reference["hit_rate"],
                    "sim_failed": row["failed"]})
    return out


def worker_flag(settings: dict, flag: str, default: str) -> str:
    args = settings.get("worker_arg") or []
    return args[args.index(flag) + 1] if flag in args[:-1] else default


def profile_line(settings: dict) -> str:
    name = worker_flag(settings, "--sim-profile", "(default)")
    try:
        from worker.executor.sim import SimProfile

        profile = SimProfile.load(name)
        data = json.loads(Path(profile.source).read_text())
        fit = data.get("fit", {})
        source = Path(profile.source).resolve()
        shown = source.relative_to(REPORTS.parents[1]) if source.is_relative_to(REPORTS.parents[1]) else source
        return (f"sim profile `{name}` ({shown}): cost model {profile.cost_model.form}, fit R^2 "
                f"{fit.get('r2', float('nan')):.3f}, mean relative error {fit.get('mean_rel_error', float('nan')):.1%}, "
                f"{fit.get('num_samples', '?')} steps; measured {data.get('measured', {}).get('date', '?')}")
    except (ImportError, OSError, ValueError) as error:
        return f"sim profile `{name}` (not readable here: {error})"


def markdown(rows: list[dict], label: str, sim: dict, gpu_source: Path) -> str:
    lines = [f"# Sim vs GPU, doc-QA on 4 llama3-8b workers: {label}", "",
             f"GPU: {gpu_source.name}. Sim: {sim['setup']}", "", profile_line(sim.get("settings", {}))
             + f"; sim workers per modelled GPU: {worker_flag(sim.get('settings', {}), '--workers-per-gpu', '1')}", "",
             "| router | GPU req/s | sim req/s | sim / GPU | req/s within 15%? | GPU hit | sim hit | sim / GPU "
             "| hit within 15%? |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['router']} | {r['gpu_req_s']:.2f} | {r['sim_req_s']:.2f} | {r['req_s_ratio']:.2f} "
                     f"| {within(r['req_s_ratio'])} | {100 * r['gpu_hit_rate']:.1f}% | {100 * r['sim_hit_rate']:.1f}% "
                     f"| {r['hit_rate_ratio']:.2f} | {within(r['hit_rate_ratio'])} |")
    failed = sum(r["sim_failed"] for r in rows)
    ok = all(abs(r[k] - 1) <= TOLERANCE for r in rows for k in ("req_s_ratio", "hit_rate_ratio"))
    lines += ["", f"All within 15%: {'yes' if ok and rows else 'no'}. Sim failed requests: {failed}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sim", type=Path, help="fleet.json of the sim run")
    parser.add_argument("out", type=Path, help="markdown file to write")
    parser.add_argument("--label", default="new profile", help="what this run is (e.g. 'old profile')")
    parser.add_argument("--gpu", type=Path, default=GPU_REPORT, help="GPU figures: the markdown report or a fleet.json")
    args = parser.parse_args(argv)
    try:
        sim = json.loads(args.sim.read_text())
        gpu = gpu_rows(args.gpu)
    except (OSError, ValueError, KeyError) as error:
        print(f"fleet_sim_vs_gpu_compare: {error}", file=sys.stderr)
        return 2
    rows = compare(sim, gpu)
    if not rows:
        print(f"fleet_sim_vs_gpu_compare: no router of {args.sim} is in the GPU figures ({', '.join(gpu)})",
              file=sys.stderr)
        return 2
    text = markdown(rows, args.label, sim, args.gpu)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
