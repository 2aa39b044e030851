"""Benchmarks that print a table and write JSON (data/benchmarks/<what>.json, not tracked; the
README's tables come from docs/benchmarks/<what>.json, written only when asked with --out).

  step-time   one sampling step, CFG against AGD, full-size architectures with random weights
  adapter-cost  what the shipped configs' adapters cost a step at several widths (--widths): the
              unguided call, CFG and AGD at each width timed in turn (paired), full size, random weights
  parameters  adapter parameter counts for full-size configs (meta device, no weights)
  gap-closed  how much of the guidance gap trained adapters close
  loader      training loader samples/s: Zarr, WebDataset, the reference layout (dir per trajectory)
  loader-shipped  the same at the shipped configs' store layouts (DiT-XL/2, SD 2.1) against the paper's
              layout (a file per trajectory, torch.load, 4 workers): one epoch, first batch included
  recording   stage one with recording against the same sampling loop without
  storage     bytes per trajectory-step and files per 1,000 trajectories, per format and codec
  lossy       adapters trained on BitRound copies of the store: gap closed against lossless
  training    one adapter-training step (fp32 / bf16 base, with and without gradient checkpointing)
              against full-model guidance distillation: peak memory, step time, what fits on a GPU
  verify-cache  train's store check on a synthetic store of --shards tiny shards (default 2,000):
              the first start re-reads every shard, the second skips those recorded and unchanged
  manifest-commit  one shard's commit into the manifest at --shards shards (default 40,000): the
              journal's append against rewriting the whole manifest
  loader-memory  peak memory (PSS of the training process and its workers) of 3 epochs of the
              loader at configs/sd-2.1.yaml's layout, 0 against 2 workers, and worker processes started
  threads     the thread policy's evidence: a training step and a CFG step of the default's size at 1
              and 2 torch threads, on the machine as it is and with one extra busy process"""

import argparse
import json
import sys
from pathlib import Path


class UsageError(Exception):
    """A bad command-line value: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line too, not the usage block
        raise UsageError(message)


def _ints(text: str, option: str, low: int, high: int | None = None) -> list[int]:
    """Comma-separated integers in [low, high], at least one."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{option}: needs at least one value")
    bad = [v for v in values if v < low or (high is not None and v > high)]
    if bad:
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UsageError(f"{option}: {bad[0]} is not allowed; values must be {allowed}")
    return values


def _latent_sides(text: str) -> dict:
    """NAME=SIDE pairs, comma-separated."""
    sides = {}
    for item in [i for i in text.replace(" ", "").split(",") if i]:
        name, _, value = item.partition("=")
        if not name or not value.isdigit() or int(value) < 8:
            raise UsageError(f"--latent-sides: expected NAME=SIDE with SIDE >= 8 (e.g. sdxl-unet=64), got {item!r}")
        sides[name] = int(value)
    return sides


def check_args(args) -> None:
    """Every option's value, before any work starts."""
    if args.repeats < 1:
        raise UsageError(f"--repeats: must be >= 1 (got {args.repeats})")
    if args.trajectories < 1:
        raise UsageError(f"--trajectories: must be >= 1 (got {args.trajectories})")
    if args.shards is not None and args.shards < (2 if args.what == "manifest-commit" else 1):
        raise UsageError(f"--shards: must be >= {2 if args.what == 'manifest-commit' else 1} (got {args.shards})")
    if args.shards is not None and args.what not in ("verify-cache", "manifest-commit"):
        raise UsageError(f"--shards: applies to verify-cache and manifest-commit, not {args.what}")
    args.batch_sizes = _ints(args.batch_sizes, "--batch-sizes", 1)
    args.keepbits = _ints(args.keepbits, "--keepbits", 1, 10)  # of float16's 10 mantissa bits
    args.architectures = [n for n in args.architectures.replace(" ", "").split(",") if n]
    if args.architectures and args.what not in ("step-time", "adapter-cost", "parameters", "training"):
        raise UsageError(f"--architectures: applies to step-time, adapter-cost, parameters and training, not "
                         f"{args.what}")
    if args.widths and args.what != "adapter-cost":
        raise UsageError(f"--widths: applies to adapter-cost, not {args.what}")
    args.widths = _ints(args.widths, "--widths", 1) if args.widths else []
    args.modes = [m for m in args.modes.replace(" ", "").split(",") if m]
    args.latent_sides = _latent_sides(args.latent_sides)
    if args.device not in ("cpu", "cuda"):
        raise UsageError(f"--device: cpu or cuda, not {args.device!r}")
    args.adapters = [f for f in args.adapters.split(",") if f.strip()]
    if args.what == "gap-closed" and not args.adapters:
        raise UsageError("--adapters: needs at least one adapter folder")
    if args.what in ("gap-closed", "storage", "lossy"):
        for folder in args.adapters if args.what == "gap-closed" else [args.store]:
            if not Path(folder).is_dir():
                option = "--adapters" if args.what == "gap-closed" else "--store"
                raise UsageError(f"{option}: {folder} is not a folder")
    if Path(args.workdir).exists() and not Path(args.workdir).is_dir():
        raise UsageError(f"--workdir: {args.workdir} is not a folder")
    args.out = Path(args.out or f"data/benchmarks/{args.what}.json")
    if args.out.is_dir():
        raise UsageError(f"--out: {args.out} is a folder; give a JSON file name")
    try:  # find out now, not after a long measurement
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out: cannot create the folder {args.out.parent} ({err.strerror})") from None


def write_json(rows, out: Path) -> None:
    try:
        out.write_text(json.dumps(rows, indent=2) + "\n")
    except OSError as err:
        raise UsageError(f"--out: cannot write {out} ({err.strerror})") from None
    print(f"written to {out}")


def main(argv=None) -> int:
    """Bad options: one ``error:`` line, exit 2. Ctrl-C, SIGTERM or SIGHUP: one line, exit status 130,
    143 or 129 (agd_pipeline.interrupts)."""
    from agd_pipeline.interrupts import interruptible

    def guarded() -> int:
        try:
            return run(argv)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return interruptible(guarded, "re-run the same command to measure again")


def parser() -> Parser:
    parser = Parser(prog="python -m stages.benchmark", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=list(BENCHMARKS), help="which benchmark")
    parser.add_argument("--architectures", default="",
                        help="comma-separated: dit-xl-2-256, dit-s-2-256, sd-2.1-unet, sdxl-unet, sd3-medium, "
                        "toy-dit-8x8 (step-time defaults to dit-xl-2-256,sd-2.1-unet)")
    parser.add_argument("--batch-sizes", default="1,4", help="step-time, adapter-cost: batch sizes (images)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="step-time, adapter-cost, training, loader-shipped: timed repeats (median; training "
                        "adds one warm-up step; loader-shipped: paired runs, min-max shown)")
    parser.add_argument("--shipped-adapters", action="store_true",
                        help="step-time: the adapters the shipped configs train (configs/*.yaml: kind, placement, "
                        "width) instead of the family's defaults")
    parser.add_argument("--widths", default="",
                        help="adapter-cost: adapter widths to time (default: the shipped config's width, a half and "
                        "a quarter of it)")
    parser.add_argument("--adapters", default="data/adapters",
                        help="gap-closed: comma-separated adapter folders to compare")
    parser.add_argument("--trajectories", type=int, default=400,
                        help="gap-closed, lossy: fresh CFG trajectories to measure on")
    parser.add_argument("--store", default="data/trajectories", help="storage, lossy: the store to start from")
    parser.add_argument("--keepbits", default="6,3", help="lossy: BitRound mantissa bits to compare")
    parser.add_argument("--workdir", default="data/benchmarks",
                        help="loader, loader-shipped, storage, lossy, verify-cache, manifest-commit: scratch "
                        "folder (lossy keeps its stores and adapters there)")
    parser.add_argument("--modes", default="agd-fp32,agd-bf16,agd-fp32-ckpt,agd-bf16-ckpt,full-fp32,full-fp32-ckpt",
                        help="training: comma-separated modes")
    parser.add_argument("--latent-sides", default="sd-2.1-unet=64,sdxl-unet=64",
                        help="training: NAME=SIDE latent sides to measure at where the native one does not fit "
                        "this machine (the projection scales to the native side); transformers run at their own")
    parser.add_argument("--device", default="cpu", help="training: cpu or cuda")
    parser.add_argument("--shards", type=int, default=None,
                        help="verify-cache, manifest-commit: shards of the synthetic store (default 2,000 tiny "
                        "shards of one trajectory, 1x8x8 latents, 4 steps / 40,000)")
    parser.add_argument("--bf16-on-cpu", action="store_true",
                        help="training: run the bf16 modes on the CPU too (slow where the CPU emulates bfloat16; "
                        "by default their memory is computed from the fp32 runs)")
    parser.add_argument("--out", default=None,
                        help="JSON file (default data/benchmarks/<what>.json, not tracked; the README's "
                        "tables come from docs/benchmarks/<what>.json)")
    return parser


def run(argv=None) -> int:
    from agd_pipeline.devices import apply_thread_policy
    from agd_pipeline.errors import AgdError

    args = parser().parse_args(argv)
    check_args(args)
    try:
        apply_thread_policy()  # as every stage does: AGD_NUM_THREADS, else 1 (`threads` varies its own)
    except AgdError as err:
        raise UsageError(str(err)) from None
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    try:
        rows = BENCHMARKS[args.what](args)
    except AgdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(rows, args.out)
    return 0


def table(header: list[str]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)


# ------------------------------------------------------------------------------ model benchmarks


def architectures(args, default: str) -> list[str]:
    from benchmarks.models import ARCHITECTURES

    names = args.architectures or default.split(",")
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown:
        raise UsageError(f"unknown architecture {unknown[0]!r}; known: {', '.join(ARCHITECTURES)}")
    return names


def step_time(args) -> list[dict]:
    from benchmarks.models import step_times
    from benchmarks.training import SHIPPED_ADAPTERS

    names, rows = architectures(args, "dit-xl-2-256,sd-2.1-unet"), []
    missing = [name for name in names if args.shipped_adapters and name not in SHIPPED_ADAPTERS]
    if missing:
        raise UsageError(f"--shipped-adapters: no shipped config trains adapters for {', '.join(missing)}; "
                         f"those that do: {', '.join(SHIPPED_ADAPTERS)}")
    table(["architecture", "batch", "CFG s/step", "AGD s/step", "unguided s/step", "AGD speed-up",
           "adapter overhead"])
    for name in names:
        shipped = SHIPPED_ADAPTERS[name] if args.shipped_adapters else None
        for r in step_times(name, args.batch_sizes, args.repeats, adapter_settings=shipped):
            rows.append(r)
            print(f"| {name} | {r['batch']} | {r['cfg_seconds']:.4f} | {r['agd_seconds']:.4f} | "
                  f"{r['unguided_seconds']:.4f} | {r['speedup_agd_over_cfg']:.2f}x | "
                  f"{r['adapter_overhead_percent']:+.1f} % |", flush=True)
    return rows


def adapter_cost(args) -> list[dict]:
    from benchmarks.models import adapter_costs
    from benchmarks.training import SHIPPED_ADAPTERS

    names, rows = architectures(args, "dit-xl-2-256,sd-2.1-unet"), []
    missing = [name for name in names if name not in SHIPPED_ADAPTERS]
    if missing:
        raise UsageError(f"adapter-cost: no shipped config trains adapters for {', '.join(missing)}; those that do: "
                         f"{', '.join(SHIPPED_ADAPTERS)}")
    table(["architecture", "batch", "adapters", "share of base", "unguided s/step", "AGD s/step", "CFG s/step",
           "adapter overhead", "AGD / CFG", "ceiling (CFG / unguided)"])
    for name in names:
        shipped = SHIPPED_ADAPTERS[name]
        widths = args.widths or sorted({shipped["width"], max(1, shipped["width"] // 2),
                                        max(1, shipped["width"] // 4)})
        for r in adapter_costs(name, widths, shipped["kind"], shipped["placement"], args.batch_sizes, args.repeats):
            rows.append(r)
            print(f"| {name} | {r['batch']} | {r['kind']} r{r['width']} at {r['placement']}"
                  f"{' (shipped)' if r['width'] == shipped['width'] else ''} | {r['adapter_share_percent']:.2f} % | "
                  f"{r['unguided_seconds']:.3f} | {r['agd_seconds']:.3f} | {r['cfg_seconds']:.3f} | "
                  f"{r['adapter_overhead_percent']:+.1f} % | {r['speedup_agd_over_cfg']:.2f}x | "
                  f"{r['cfg_over_unguided']:.2f}x |", flush=True)
    return rows


def parameters(args) -> list[dict]:
    from benchmarks.models import parameter_table

    names, rows = architectures(args, "dit-xl-2-256,sd-2.1-unet,sdxl-unet,sd3-medium,toy-dit-8x8"), []
    table(["architecture", "adapter", "placement", "width", "parameters", "share of base"])
    for name in names:
        for r in parameter_table(name):
            rows.append(r)
            width = f"**{r['width']}** (~2 %)" if "reaches_target_percent" in r else r["width"]
            print(f"| {name} | {r['kind']} | {r['placement']} | {width} | "
                  f"{r['adapter_parameters']:,} | {r['share_percent']:.2f} % |", flush=True)
    return rows


def gap_closed(args) -> list[dict]:
    from agd_pipeline.evaluation import gap_closed as measure

    rows = []
    table(["adapters", "gap closed", "per w bin"])
    for folder in args.adapters:
        r = measure(folder, args.trajectories)
        rows.append(r)
        bins = " ".join(f"{k}: {v:.3f}" for k, v in r["per_w_bin"].items())
        print(f"| {folder} | {r['overall']:.3f} | {bins} |", flush=True)
    return rows


# ------------------------------------------------------------------------------- data benchmarks


def loader(args) -> list[dict]:
    from benchmarks import data_path

    rows = data_path.loader_table(workdir=args.workdir)
    consumed = data_path.training_consumption()
    print(f"one adapter training step of the default consumes {consumed:,.0f} samples/s here")
    table(["latent", "Zarr loader", "WebDataset loader", "reference layout", "Zarr / reference",
           "WebDataset / reference", "Zarr / training step"])
    for r in rows:
        r["training_consumes_samples_per_s"] = consumed
        print(f"| {r['latent']} | {r['zarr_samples_per_s']:,.0f}/s | {r['webdataset_samples_per_s']:,.0f}/s | "
              f"{r['reference_samples_per_s']:,.0f}/s | {r['zarr_over_reference']:.1f}x | "
              f"{r['webdataset_over_reference']:.1f}x | {r['zarr_samples_per_s'] / consumed:.1f}x |")
    return rows


def loader_shipped(args) -> list[dict]:
    import numpy as np

    from benchmarks import data_path

    rows = data_path.shipped_loader_table(repeats=args.repeats, workdir=args.workdir)

    def spread(values, unit=""):
        low, mid, high = min(values), float(np.median(values)), max(values)
        return f"{mid:,.1f}{unit} ({low:,.1f}-{high:,.1f})"

    table(["config", "layout", "Zarr loader", "WebDataset loader", "paper layout", "Zarr / paper",
           "WebDataset / paper", "files per 1,000 trajectories (Zarr / WebDataset / paper)"])
    for r in rows:
        print(f"| {r['config']} | {r['latent']}, {r['steps']} steps, shards of {r['shard_size']}, chunks of "
              f"{r['unit_trajectories']}, batch {r['batch_size']} | {spread(r['zarr_samples_per_s'], '/s')} | "
              f"{spread(r['webdataset_samples_per_s'], '/s')} | {spread(r['paper_samples_per_s'], '/s')} | "
              f"{spread(r['zarr_over_paper'], 'x')} | {spread(r['webdataset_over_paper'], 'x')} | "
              f"{r['zarr_files_per_1000']:,.0f} / {r['webdataset_files_per_1000']:,.0f} / "
              f"{r['paper_files_per_1000']:,.0f} |")
    return rows


def recording(args) -> list[dict]:
    from benchmarks import data_path

    rows = [data_path.recording_overhead(),  # the embedded default: 600 trajectories of 32 steps
            data_path.recording_overhead(batch=8, steps=8, batches=2, architecture="dit-s-2-256")]
    table(["architecture", "trajectories x steps", "without recording", "with recording", "overhead"])
    for r in rows:
        print(f"| {r['architecture']} | {r['trajectories']} x {r['steps']} | "
              f"{r['seconds_without_recording']:.2f} s | {r['seconds_with_recording']:.2f} s | "
              f"{r['overhead_percent']:+.1f} % |")
    return rows


def storage(args) -> list[dict]:
    from benchmarks import data_path

    rows = data_path.storage_table(args.store, workdir=args.workdir)
    table(["format", "codec", "BitRound bits", "bytes / trajectory-step", "vs raw fp16", "files / 1,000 trajectories"])
    for r in rows:
        bits = r["bitround_keepbits"] or "lossless"
        print(f"| {r['format']} | {r['compressor']} | {bits} | {r['bytes_per_trajectory_step']:,.0f} | "
              f"{r['ratio_to_raw']:.2f} | {r['files_per_1000_trajectories']:,.0f} |")
    return rows


def lossy(args) -> list[dict]:
    from benchmarks import data_path

    rows = data_path.lossy_table(args.store, Path(args.workdir) / "lossy", args.keepbits,
                                 trajectories=args.trajectories)
    table(["BitRound bits", "store MiB", "gap closed"])
    for r in rows:
        print(f"| {r['bitround_keepbits'] or 'lossless'} | {r['store_mib']:.1f} | {r['gap_closed']:.3f} |")
    return rows


def training(args) -> list[dict]:
    from benchmarks.training import GIB, MODES, training_table

    names = architectures(args, "dit-xl-2-256,sd-2.1-unet,sdxl-unet")
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        raise UsageError(f"--modes: unknown mode {(unknown or [''])[0]!r}; known: {', '.join(MODES)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device here")
    table(["architecture", "mode", "latent", "trainable parameters", "optimizer state", "peak memory",
           "s/step", "measured"])

    def show(r):
        peak = f"{r['peak_bytes'] / GIB:.2f} GiB" if "peak_bytes" in r else "-"
        seconds = f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else "-"
        print(f"| {r['architecture']} | {r['mode']} | {r['latent_side']}x{r['latent_side']} (native "
              f"{r['native_latent_side']}) | {r['trainable_parameters']:,} | {r['optimizer_bytes'] / GIB:.3f} GiB | "
              f"{peak} | {seconds} | {'yes' if r['measured'] else 'computed'} |", flush=True)

    rows = training_table(names, args.modes, args.latent_sides, args.repeats, args.device, on_row=show,
                          bf16_on_cpu=args.bf16_on_cpu)
    print("\nprojected to the native resolution (static + per-image activations; 1 GiB reserved):")
    table(["architecture", "mode", "static", "per image", "peak at batch 1", "largest batch 24 / 40 / 80 GB"])
    for r in rows:
        if "projected_peak_bytes_batch_1" not in r:
            continue
        print(f"| {r['architecture']} | {r['mode']} | {r['static_bytes'] / GIB:.2f} GiB | "
              f"{r['projected_activation_bytes_per_image'] / GIB:.2f} GiB | "
              f"{r['projected_peak_bytes_batch_1'] / GIB:.2f} GiB | {r['largest_batch_24gb']} / "
              f"{r['largest_batch_40gb']} / {r['largest_batch_80gb']} |")
    return rows


def verify_cache(args) -> list[dict]:
    from benchmarks.store import verify_cache_table

    rows = verify_cache_table(shards=args.shards or 2000, workdir=args.workdir)
    print(f"a store of {rows[0]['shards']:,} shards ({rows[0]['latent']}, {rows[0]['steps']} steps, "
          f"{rows[0]['files']:,} files; written in {rows[0]['seconds_to_write_store']:.0f} s)")
    table(["check", "train.verify", "seconds", "shards re-read", "shards skipped (recorded, unchanged)"])
    for r in rows:
        print(f"| {r['check']} | {r['mode']} | {r['seconds']:.2f} | {r['shards_re_read']:,} | "
              f"{r['shards_skipped']:,} |")
    return rows


def manifest_commit(args) -> list[dict]:
    from benchmarks.store import manifest_commit_table

    rows = manifest_commit_table(shards=(args.shards or 40_000,), workdir=args.workdir)
    table(["shards", "commit: journal append (median)", "slowest append", "commit before: whole manifest rewritten",
           "manifest MiB (complete)", "read_manifest with journal"])
    for r in rows:
        print(f"| {r['shards']:,} | {1000 * r['append_seconds']:.2f} ms | {1000 * r['append_max_seconds']:.2f} ms | "
              f"{1000 * r['rewrite_seconds']:.0f} ms | {r['manifest_bytes_complete'] / 2**20:.1f} | "
              f"{1000 * r['read_manifest_seconds']:.0f} ms |")
    return rows


def loader_memory(args) -> list[dict]:
    from benchmarks import data_path

    rows = data_path.loader_memory_table(workdir=args.workdir)
    table(["config", "workers", "before (PSS)", "peak (PSS, process and workers)", "peak / 0 workers",
           "worker processes started", "epochs", "seconds"])
    for r in rows:
        print(f"| {r['config']} | {r['workers']} | {r['before_bytes'] / 2**20:,.0f} MiB | "
              f"{r['peak_bytes'] / 2**20:,.0f} MiB | {r['peak_over_0_workers']:.2f}x | {r['worker_processes']} | "
              f"{r['epochs']} | {r['seconds']:.1f} |")
    return rows


def threads(args) -> list[dict]:
    from benchmarks.models import thread_table

    rows = thread_table(repeats=max(3, args.repeats))
    table(["load", "step", "threads", "median seconds (min-max)", "time / 1 thread", "load average"])
    for r in rows:
        print(f"| {r['load']} | {r['step']} (batch {r['batch']}) | {r['threads']} | {r['median_seconds']:.3f} "
              f"({r['min_seconds']:.3f}-{r['max_seconds']:.3f}) | {r['over_1_thread']:.2f} | "
              f"{r['load_average']:.1f} |")
    return rows


BENCHMARKS = {"step-time": step_time, "adapter-cost": adapter_cost, "parameters": parameters,
              "gap-closed": gap_closed, "loader": loader,
              "loader-shipped": loader_shipped,
              "recording": recording, "storage": storage, "lossy": lossy,
              "training": training, "verify-cache": verify_cache, "manifest-commit": manifest_commit,
              "loader-memory": loader_memory, "threads": threads}


if __name__ == "__main__":
    sys.exit(main())
