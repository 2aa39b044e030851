"""Sample images with trained adapters: one network evaluation per step, decoded with the
pipeline's VAE and written as PNGs. With --cfg the same seeds are sampled with plain
classifier-free guidance (two evaluations per step) for comparison. Class-conditional models take
--classes; text models (SD, SDXL, SD3) take --prompt and/or --prompts-file."""

import argparse
import math
import os
import re
import sys
from pathlib import Path

from agd_pipeline.cli import command_line, one_line_errors, run_command
from agd_pipeline.config import MAX_SEED, OUTPUT_MARKERS


OWN_NAMES = re.compile(r"\d{5}_(class|prompt)\d+\.png|grid\.png|samples\.json")


def sample_output_name(name: str) -> bool:
    """What stages.sample writes into --out-dir: anything else there is refused, never overwritten."""
    return OWN_NAMES.fullmatch(name) is not None


def parse_classes(text: str) -> list[int] | None:
    return [int(c) for c in text.replace(",", " ").split()] if text.strip() else None


def check_args(args) -> str | None:
    """What is wrong with the options, naming the option, before anything loads (or None)."""
    if not args.adapters.strip():
        return f"--adapters: give the adapter folder written by `{command_line('train')}`"
    try:
        parse_classes(args.classes)
    except ValueError as err:
        return f"--classes: must be integers, comma-separated ({err})"
    if args.per_class <= 0:
        return f"--per-class: must be positive (got {args.per_class})"
    if args.batch_size <= 0:
        return f"--batch-size: must be positive (got {args.batch_size})"
    if args.steps < 0:
        return f"--steps: must be >= 0; 0 takes the steps of the training data (got {args.steps})"
    if not 0 <= args.seed <= MAX_SEED:
        return f"--seed: must lie in [0, {MAX_SEED}] (got {args.seed})"
    if not args.out_dir.strip():
        return "--out-dir: give a folder for the images"
    out = Path(args.out_dir)
    for folder in (out, *out.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                return f"--out-dir: {str(folder)!r} exists and is not a folder"
            break
    for marker, kind in OUTPUT_MARKERS.items():
        if (out / marker).is_file():
            return f"--out-dir: {args.out_dir!r} holds {kind} ({marker}); choose another folder for the images"
    if args.device != "auto":
        from agd_pipeline.devices import resolve_device
        from agd_pipeline.errors import ConfigError

        try:
            resolve_device(args.device, "--device")
        except ConfigError as err:
            return str(err)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=command_line("sample"), description=__doc__)
    parser.add_argument("--adapters", default="data/adapters", help="adapter folder from stages.train")
    parser.add_argument("--base-model", default="", help="base model; empty takes the adapters' own")
    parser.add_argument("--guidance-scale", "-w", type=float, default=4.0, help="guidance scale w")
    parser.add_argument("--classes", default="", help="comma-separated class ids; empty means all")
    parser.add_argument("--prompt", action="append", default=[],
                        help="text models: a prompt (repeat the option for several)")
    parser.add_argument("--prompts-file", default="", help="text models: a file with one prompt per line")
    parser.add_argument("--negative-prompt", default="", help="text models: the negative prompt. Adapters "
                        "distilled from a store with negative prompts (generate.negative_prompts_file; "
                        "condition_on negative_text) are given its embeddings; with --cfg it is the "
                        "unconditional branch's prompt. Empty takes the one the adapters were distilled with "
                        "(the pipeline's default unless generate.negative_prompt was set). Other adapters "
                        "ignore it (AGD itself makes no unconditional call)")
    parser.add_argument("--per-class", type=int, default=8, help="images per class (or per prompt)")
    parser.add_argument("--steps", type=int, default=0, help="sampling steps; 0 takes the training data's")
    parser.add_argument("--seed", type=int, default=0, help="seed; image i's noise depends on (seed, i)")
    parser.add_argument("--cfg", action="store_true", help="adapters off: plain CFG, 2 evaluations per step")
    parser.add_argument("--batch-size", type=int, default=64, help="images sampled together")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, ...")
    parser.add_argument("--scheduler", default="", help="diffusers scheduler class to sample with; empty: the "
                        "one the adapters' trajectories were recorded with (another one warns)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype the base model runs in")
    parser.add_argument("--out-dir", default="samples", help="folder for the PNGs, grid.png, samples.json")
    one_line_errors(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        from agd_pipeline.inference import sample_images, save_images
        from agd_pipeline.locks import FolderLock
        from agd_pipeline.models import read_prompts
        from agd_pipeline.outputs import claim_output

        out = Path(args.out_dir)
        claim = (out, "--out-dir", "stages.sample", lambda folder: (folder / "samples.json").is_file(),
                 [args.adapters, args.base_model], sample_output_name)
        claim_output(*claim)  # before any work: a folder of someone else's is refused, nothing written
        prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
        result = sample_images(args.adapters, args.guidance_scale, parse_classes(args.classes), args.per_class,
                               args.steps, args.seed, not args.cfg, args.base_model, args.device, args.batch_size,
                               prompts=prompts, negative_prompt=args.negative_prompt, dtype=args.dtype,
                               scheduler=args.scheduler)
        with FolderLock(out, "stages.sample"):  # the folder is created only now, with something to write
            if claim_output(*claim):  # an earlier sample run: its images go, none is left to mix with these
                for name in os.listdir(out):
                    if sample_output_name(name):
                        (out / name).unlink()
            out = save_images(result, args.out_dir)
        lo, hi = result["training_range"] or (-math.inf, math.inf)
        note = "" if lo <= args.guidance_scale <= hi else f" (outside the training range [{lo:g}, {hi:g}])"
        print(f"{out}: {len(result['labels'])} images, {result['method'].upper()} w={args.guidance_scale:g}{note}, "
              f"{result['nfe_per_image']} network evaluations per image, {result['seconds']:.1f} s")

    return run_command(body, lambda: check_args(args),
                       interrupted="re-run the same command to sample (every image is written again)")

if __name__ == "__main__":
    sys.exit(main())
