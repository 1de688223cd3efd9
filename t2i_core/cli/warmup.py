"""``t2i warmup``: compile a model for some sizes and save torch's portable compile artefacts to a file."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidRequestError
from .args import integer, number
from .logs import quiet_libraries

HELP = "compile a model for some sizes and save the compiled code to a portable file"
DESCRIPTION = (
    "Compile MODEL with its compile accelerators for each --size and save torch's portable "
    "compile artefacts to OUT; T2I_COMPILE_ARTIFACTS=OUT in a later process (this machine or another with "
    "the same GPU, torch and model) skips the compilation."
)


def add_arguments(warm: argparse.ArgumentParser) -> None:
    warm.add_argument("--model", "-m", required=True, help="hub id, local diffusers folder, alias or tiny:<family>")
    warm.add_argument("--family", help="model family; default: detect from model_index.json")
    warm.add_argument(
        "--accelerator",
        action="append",
        required=True,
        metavar="NAME[@VALUE]",
        help="accelerator or preset (repeatable); NAME@VALUE gives an accelerator its value: first-block-cache@0.15",
    )
    warm.add_argument("--device", default="auto", help='"auto" (cuda > mps > cpu), cpu, cuda, cuda:N, mps')
    warm.add_argument(
        "--size", action="append", default=[], metavar="HxW", help="a size to compile for (repeatable); default native"
    )
    warm.add_argument("--num-images", dest="num_images", type=integer, default=1, metavar="N", help="batch size")
    warm.add_argument("--guidance-scale", dest="guidance_scale", type=number, metavar="G")
    warm.add_argument("--output", "-o", required=True, metavar="OUT", help="the artefacts file to write")
    warm.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def run(args: argparse.Namespace) -> int:
    """``t2i warmup``: one short generation per size, then torch's portable compile artefacts to a file."""
    from ..request import GenerationRequest
    from .outputs import check_output

    sizes: list[tuple[int | None, int | None]] = [size_argument(text) for text in args.size] or [(None, None)]
    out = Path(args.output)
    check_output(out, args.overwrite)
    requests = [
        GenerationRequest(
            prompt="warm-up",
            height=height,
            width=width,
            num_inference_steps=2,
            guidance_scale=args.guidance_scale,
            num_images=args.num_images,
            seed=0,
        )
        for height, width in sizes
    ]
    quiet_libraries()
    from .. import get_registry, load
    from ..builtins.compile import compile_stats, save_compile_artifacts

    engine = load(args.model, family=args.family, device=args.device, accelerators=args.accelerator, cache=False)
    registry = get_registry()
    if not any(registry.accelerator(spec).compiles for spec in engine.accelerators):
        allowed = "a compile accelerator or a preset that compiles on " + engine.device
        raise InvalidRequestError("--accelerator", ",".join(args.accelerator), allowed)
    # Every size is checked before the first compiles: a bad last size must not cost the others' compile time.
    resolved = [engine.resolve(request)[0] for request in requests]
    for request, checked in zip(requests, resolved, strict=True):
        engine.generate(request)
        print(f"compiled for {checked.height}x{checked.width}, {request.num_images} image(s)")
    kinds = save_compile_artifacts(out, overwrite=args.overwrite)
    stats = compile_stats(engine.pipeline)
    counted = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "no artefacts"
    print(f"{out}  ({out.stat().st_size} bytes: {counted}; compiled models: {', '.join(stats) or 'regional blocks'})")
    return 0


def size_argument(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    try:
        if not sep:
            raise ValueError(text)
        return int(height), int(width)
    except ValueError:
        raise InvalidRequestError("--size", text, "HEIGHTxWIDTH, e.g. 1024x1024") from None
