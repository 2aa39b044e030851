"""Sample images with trained adapters: one network evaluation per step, decoded with the
pipeline's VAE and written as PNGs. With --cfg the same seeds are sampled with plain
classifier-free guidance (two evaluations per step) for comparison. Class-conditional models take
--classes; text models (SD, SDXL, SD3) take --prompt and/or --prompts-file."""

import argparse
import sys

from agd_pipeline.errors import AgdError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.sample", description=__doc__)
    parser.add_argument("--adapters", default="data/adapters", help="adapter folder from stages.train")
    parser.add_argument("--base-model", default="", help="base model; empty takes the adapters' own")
    parser.add_argument("--guidance-scale", "-w", type=float, default=4.0, help="guidance scale w")
    parser.add_argument("--classes", default="", help="comma-separated class ids; empty means all")
    parser.add_argument("--prompt", action="append", default=[],
                        help="text models: a prompt (repeat the option for several)")
    parser.add_argument("--prompts-file", default="", help="text models: a file with one prompt per line")
    parser.add_argument("--negative-prompt", default="", help="text models, with --cfg: negative prompt of "
                        "CFG's unconditional branch; empty takes the one the adapters were distilled with "
                        "(AGD itself makes no unconditional call)")
    parser.add_argument("--per-class", type=int, default=8, help="images per class (or per prompt)")
    parser.add_argument("--steps", type=int, default=0, help="sampling steps; 0 takes the training data's")
    parser.add_argument("--seed", type=int, default=0, help="seed; image i's noise depends on (seed, i)")
    parser.add_argument("--cfg", action="store_true", help="adapters off: plain CFG, 2 evaluations per step")
    parser.add_argument("--batch-size", type=int, default=64, help="images sampled together")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype the base model runs in")
    parser.add_argument("--out-dir", default="samples", help="folder for the PNGs, grid.png, samples.json")
    args = parser.parse_args(argv)
    from agd_pipeline.inference import sample_images, save_images

    try:
        classes = [int(c) for c in args.classes.replace(",", " ").split()] if args.classes.strip() else None
        prompts = list(args.prompt)
        if args.prompts_file:
            from agd_pipeline.models import read_prompts

            prompts += read_prompts(args.prompts_file)
        result = sample_images(args.adapters, args.guidance_scale, classes, args.per_class, args.steps,
                               args.seed, not args.cfg, args.base_model, args.device, args.batch_size,
                               prompts=prompts, negative_prompt=args.negative_prompt, dtype=args.dtype)
        out = save_images(result, args.out_dir)
    except ValueError as err:
        print(f"error: --classes must be integers ({err})", file=sys.stderr)
        return 2
    except AgdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lo, hi = result["training_range"]
    note = "" if lo <= args.guidance_scale <= hi else f" (outside the training range [{lo:g}, {hi:g}])"
    print(f"{out}: {len(result['labels'])} images, {result['method'].upper()} w={args.guidance_scale:g}{note}, "
          f"{result['nfe_per_image']} network evaluations per image, {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
