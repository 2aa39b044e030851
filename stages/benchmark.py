"""Benchmarks that print a table and write JSON: the time of one sampling step, CFG against AGD,
on full-size architectures with random weights (this machine, this run), and adapter parameter counts
for full-size configs (built on the meta device, no weights)."""

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.benchmark", description=__doc__)
    parser.add_argument("what", choices=["step-time", "parameters", "gap-closed"], help="which benchmark")
    parser.add_argument("--architectures", default="",
                        help="comma-separated: dit-xl-2-256, sd-2.1-unet, sdxl-unet, sd3-medium, toy-dit-8x8 (step-time defaults to dit-xl-2-256,sd-2.1-unet)")
    parser.add_argument("--batch-sizes", default="1,4", help="step-time: batch sizes (images)")
    parser.add_argument("--repeats", type=int, default=3, help="step-time: timed repeats (median)")
    parser.add_argument("--adapters", default="data/adapters",
                        help="gap-closed: comma-separated adapter folders to compare")
    parser.add_argument("--trajectories", type=int, default=400,
                        help="gap-closed: fresh CFG trajectories to measure on")
    parser.add_argument("--out", default=None, help="JSON file (default docs/benchmarks/<what>.json)")
    args = parser.parse_args(argv)
    from agd_pipeline.benchmark import ARCHITECTURES, parameter_table, step_times

    default = "dit-xl-2-256,sd-2.1-unet" if args.what == "step-time" else \
        "dit-xl-2-256,sd-2.1-unet,sdxl-unet,sd3-medium,toy-dit-8x8"
    names = [n for n in (args.architectures or default).split(",") if n]
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown:
        print(f"error: unknown architecture {unknown[0]!r}; known: {', '.join(ARCHITECTURES)}", file=sys.stderr)
        return 2
    rows = []
    if args.what == "gap-closed":
        from agd_pipeline.errors import AgdError
        from agd_pipeline.evaluation import gap_closed

        print("| adapters | gap closed | per w bin |")
        print("|---|---|---|")
        for folder in [f for f in args.adapters.split(",") if f]:
            try:
                r = gap_closed(folder, args.trajectories)
            except AgdError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            rows.append(r)
            bins = " ".join(f"{k}: {v:.3f}" for k, v in r["per_w_bin"].items())
            print(f"| {folder} | {r['overall']:.3f} | {bins} |", flush=True)
    elif args.what == "step-time":
        batches = [int(b) for b in args.batch_sizes.split(",")]
        print("| architecture | batch | CFG s/step | AGD s/step | unguided s/step | AGD speed-up | adapter overhead |")
        print("|---|---|---|---|---|---|---|")
        for name in names:
            for r in step_times(name, batches, args.repeats):
                rows.append(r)
                print(f"| {name} | {r['batch']} | {r['cfg_seconds']:.4f} | {r['agd_seconds']:.4f} | "
                      f"{r['unguided_seconds']:.4f} | {r['speedup_agd_over_cfg']:.2f}x | "
                      f"{r['adapter_overhead_percent']:+.1f} % |", flush=True)
    else:
        print("| architecture | adapter | placement | width | parameters | share of base |")
        print("|---|---|---|---|---|---|")
        for name in names:
            for r in parameter_table(name):
                rows.append(r)
                width = f"**{r['width']}** (~2 %)" if "reaches_target_percent" in r else r["width"]
                print(f"| {name} | {r['kind']} | {r['placement']} | {width} | "
                      f"{r['adapter_parameters']:,} | {r['share_percent']:.2f} % |", flush=True)
    out = Path(args.out or f"docs/benchmarks/{args.what}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
