"""``t2i generate``: a prompt (or ``--from`` a saved PNG) to PNG files with the run's settings as metadata.

Only `add_arguments` runs for ``t2i --help``; the engine, diffusers and torch are imported in `run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import OutputError
from .args import UsageError, integer, key_values, number
from .logs import progress_bar, quiet_libraries

HELP = "generate images from a prompt"
DESCRIPTION = "Generate images from a prompt."


def add_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("prompt", metavar="PROMPT", nargs="?", help="the prompt (required unless --from gives it)")
    gen.add_argument(
        "--model",
        "-m",
        help="hub id, local diffusers folder, alias (sd15) or tiny:<family> (required unless --from gives it)",
    )
    gen.add_argument(
        "--from",
        dest="from_image",
        metavar="IMAGE.png",
        help="make an image again from the settings t2i saved in this PNG; other flags override them",
    )
    gen.add_argument("--family", help="model family (provider name); default: detect from model_index.json")
    gen.add_argument("--negative-prompt", dest="negative_prompt", metavar="TEXT", help="what to steer away from")
    gen.add_argument("--height", type=integer, metavar="H", help="in pixels, a multiple of 8; default: the model's")
    gen.add_argument("--width", type=integer, metavar="W", help="in pixels, a multiple of 8; default: the model's")
    gen.add_argument("--steps", type=integer, metavar="N", help="number of denoising steps")
    gen.add_argument("--guidance-scale", dest="guidance_scale", type=number, metavar="G", help="default: the family's")
    gen.add_argument("--seed", type=integer, metavar="S", help="default: a fresh random seed (printed)")
    gen.add_argument(
        "--num-images",
        dest="num_images",
        type=integer,
        default=1,
        metavar="N",
        help="saved as OUT-0.png, OUT-1.png...",
    )
    gen.add_argument(
        "--weighting",
        "--prompt-weighting",
        dest="weighting",
        metavar="SYNTAX",
        help='prompt weighting syntax: "compel", "compel-long", "a1111" (A1111 emphasis)',
    )
    gen.add_argument("--scheduler", metavar="NAME", help="sampler: default, ddim, euler, dpm++-2m, ... (see docs)")
    gen.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a family option (repeatable)")
    gen.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="IMAGE=MODEL[@SCALE]",
        help="a ControlNet control (repeatable)",
    )
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="SOURCE[@SCALE]",
        help="a LoRA: .safetensors file, folder or hub id, scale default 1 (repeatable; needs t2i-lora)",
    )
    gen.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="SOURCE[=TOKEN]",
        help="a textual-inversion embedding and the token that stands for it in prompts (repeatable)",
    )
    gen.add_argument(
        "--image-prompt",
        dest="image_prompt",
        action="append",
        default=[],
        metavar="FILE[@SCALE]",
        help="an image prompt (IP-Adapter): a reference image that steers the image, scale default 1 "
        "(repeatable; needs t2i-ipadapter)",
    )
    gen.add_argument(
        "--image-prompt-model",
        dest="image_prompt_model",
        metavar="M",
        help="the IP-Adapter of the image prompts: hub id, folder, weights file or tiny:ip-adapter-<family> "
        "(default: h94/IP-Adapter, with the family's weights file in it)",
    )
    gen.add_argument(
        "--lora-dir",
        dest="lora_dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of LoRAs that <lora:NAME:WEIGHT> tags in the prompt name (repeatable; default: $T2I_LORA_DIR)",
    )
    gen.add_argument(
        "--embeddings-dir",
        dest="embedding_dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of embeddings: a prompt word equal to a file's name uses it (repeatable; "
        "default: $T2I_EMBEDDINGS_DIR)",
    )
    gen.add_argument(
        "--hires-scale",
        dest="hires_scale",
        type=number,
        metavar="X",
        help="hires fix (a second, larger pass; any --hires-* flag turns it on): enlarge X times, in [1, 8] (default 2)",
    )
    gen.add_argument(
        "--hires-upscaler",
        dest="hires_upscaler",
        metavar="NAME",
        help="hires fix: latent (default), latent-nearest or lanczos (decode, resize the image, encode)",
    )
    gen.add_argument(
        "--hires-strength",
        dest="hires_strength",
        type=number,
        metavar="S",
        help="hires fix: the fraction of the schedule the second pass runs again, in (0, 1] (default 0.55)",
    )
    gen.add_argument(
        "--hires-steps",
        dest="hires_steps",
        type=integer,
        metavar="N",
        help="hires fix: steps of the second pass's schedule (default: those of the first)",
    )
    gen.add_argument(
        "--config",
        metavar="C",
        help="for a single-file --model: the diffusers folder, hub id or tiny:<family> with its configs",
    )
    gen.add_argument(
        "--accelerator",
        action="append",
        default=None,
        metavar="NAME[@VALUE]",
        help="accelerator or preset (repeatable); NAME@VALUE gives an accelerator its value: first-block-cache@0.15; "
        "default: those saved in the --from PNG, else the auto preset",
    )
    gen.add_argument("--device", default="auto", help='"auto" (cuda > mps > cpu), cpu, cuda, cuda:N, mps')
    gen.add_argument(
        "--output", "-o", default="t2i.png", metavar="OUT.png", help="output PNG (numbered with --num-images)"
    )
    existing = gen.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing output files")
    existing.add_argument(
        "--skip-existing",
        dest="skip_existing",
        action="store_true",
        help="keep outputs that exist and save only the missing ones (finishes an interrupted --num-images run)",
    )
    gen.add_argument("--allow-pickle", dest="allow_pickle", action="store_true", help="also load .bin (pickle) weights")


def run(args: argparse.Namespace) -> int:
    """Generate the images of `args` and save them; returns the exit status."""
    from ..request import GenerationRequest
    from . import flags, outputs, rerun  # what a run needs; t2i --help reads only add_arguments

    if args.from_image is None:
        absent = [name for name, value in (("PROMPT", args.prompt), ("--model/-m", args.model)) if value is None]
        if absent:
            raise UsageError(f"the following arguments are required: {', '.join(absent)} (or --from IMAGE.png)")
    flags.check_folders(args.lora_dirs, "--lora-dir")
    flags.check_folders(args.embedding_dirs, "--embeddings-dir")
    saved_controls = rerun.apply_saved_run(args) if args.from_image is not None else ()
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        num_images=args.num_images,
        prompt_weighting=args.weighting,
        controls=flags.controls(args.control) if args.control else saved_controls,
        image_prompts=flags.image_prompts(args.image_prompt, args.image_prompt_model)
        if args.image_prompt or args.from_image is None
        else rerun.saved_image_prompts(Path(args.from_image), args.image_prompt_model),
        scheduler=args.scheduler,
        options=key_values(args.option, "--option", "KEY=VALUE"),
        loras=flags.loras(args.lora),
        embeddings=flags.embeddings(args.embedding),
        hires=flags.hires(args),
    )
    if args.from_image is not None:
        request = rerun.saved_weights(Path(args.from_image), request, args)
    paths = outputs.output_paths(args.output, request.num_images)
    for path in paths:
        outputs.check_output(path, args.overwrite or args.skip_existing)
    kept: dict[int, dict[str, str]] = {}
    if args.skip_existing:
        kept = outputs.kept_outputs(paths)
        if kept:
            request = outputs.resume(request, kept, paths, args.model)
        if len(kept) == len(paths):
            assert request.seed is not None
            for index, path in enumerate(paths):
                print(f"{path}  (seed {request.seed + index}, kept)")
            print(f"nothing to do: all {len(paths)} output(s) exist")
            return 0
    missing = [path for index, path in enumerate(paths) if index not in kept]
    outputs.check_space(missing, outputs.MIN_PNG_BYTES)
    flags.check_image_files(request)

    quiet_libraries()
    from .. import load

    engine = load(
        args.model,
        family=args.family,
        device=args.device,
        accelerators=args.accelerator,
        allow_pickle=args.allow_pickle,
        config=args.config,
    )
    if args.lora_dirs:
        engine.lora_dirs = tuple(args.lora_dirs)
    if args.embedding_dirs:
        engine.embedding_dirs = tuple(args.embedding_dirs)
    if args.from_image is not None:
        rerun.check_prompt_files(Path(args.from_image), engine.expand(request), request)
    resolved, _ = engine.resolve(request)  # report bad options before the progress bar starts
    if kept:
        outputs.check_same_run(kept, paths, resolved, engine)
    outputs.check_space(missing, outputs.png_bound(resolved))
    with progress_bar(resolved.num_inference_steps or 0) as progress:
        result = engine.generate(request, progress=progress)
    # The whole batch is generated even when some images are kept: image i of a batch equals a
    # lone run of seed s + i only up to rounding, so a smaller batch would not remake it exactly.
    for index, path in enumerate(paths):
        if index in kept:
            print(f"{path}  (seed {result.seeds[index]}, kept)")
            continue
        try:
            result.save(path, index, overwrite=args.overwrite)
        except OutputError as exc:
            if len(paths) == 1:
                raise
            hint = f"{exc.reason}; rerun with --skip-existing to make the missing images"
            raise OutputError(exc.path, hint, exc.errno) from None
        print(f"{path}  (seed {result.seeds[index]})")
    return 0
