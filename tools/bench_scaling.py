"""How pass application time grows with graph size.

Applies a pass chain (default ``cleanup,bnfuse``) to generated graphs (tools/gen_graph.py) of
2.5k, 5k, 10k and 20k nodes and prints seconds, seconds per 1k nodes, and the time of the pass
alone vs the verification run. Linear growth means a flat "s / 1k nodes" column.

    python tools/bench_scaling.py --passes cleanup,bnfuse --sizes 2500,5000,10000,20000 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_graph  # noqa: E402

import onnxopt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", default="cleanup,bnfuse")
    ap.add_argument("--sizes", default="2500,5000,10000,20000")
    ap.add_argument("--repeat", type=int, default=3, help="median of this many runs per size")
    ap.add_argument("--verify", action="store_true", help="include onnxruntime verification in the timing")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    rows = []
    print(f"passes: {args.passes}   (median of {args.repeat}; verification {'on' if args.verify else 'off'})")
    print(f"{'nodes':>8} {'after':>8} {'total s':>9} {'s/1k nodes':>11}  per pass")
    for size in (int(s) for s in args.sizes.split(",")):
        model = gen_graph.build(size)
        times, report, out = [], None, None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out, report = onnxopt.apply(model, args.passes, verify=args.verify, summarize_layers=False)
            times.append(time.perf_counter() - t0)
        total = sorted(times)[len(times) // 2]
        per_pass = {p.name: round(p.seconds, 3) for p in report.passes}
        rows.append({"nodes": len(model.graph.node), "nodes_after": len(out.graph.node), "seconds": round(total, 3),
                     "seconds_per_1k_nodes": round(1000 * total / len(model.graph.node), 4), "per_pass": per_pass})
        r = rows[-1]
        print(f"{r['nodes']:>8} {r['nodes_after']:>8} {r['seconds']:>9.2f} {r['seconds_per_1k_nodes']:>11.3f}  {per_pass}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
