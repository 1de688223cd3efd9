"""The ``t2i`` command line: ``t2i generate`` and ``t2i plugins``.

Heavy libraries are imported only once a model is loaded, so ``t2i --help`` and
``t2i plugins`` stay instant. Every error the user can fix is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import InvalidRequestError, T2IError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"t2i: error: {message} (see t2i --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="t2i", description="Text-to-image generation with pluggable model families.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    gen = commands.add_parser(
        "generate", help="generate images from a prompt", description="Generate images from a prompt."
    )
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument(
        "--model", "-m", required=True, help="hub id, local diffusers folder, alias (sd15) or tiny:<family>"
    )
    gen.add_argument("--family", help="model family (provider name); default: detect from model_index.json")
    gen.add_argument("--negative-prompt", dest="negative_prompt", metavar="TEXT")
    gen.add_argument("--height", type=_integer, metavar="H")
    gen.add_argument("--width", type=_integer, metavar="W")
    gen.add_argument("--steps", type=_integer, metavar="N", help="number of denoising steps")
    gen.add_argument("--guidance-scale", dest="guidance_scale", type=_number, metavar="G")
    gen.add_argument("--seed", type=_integer, metavar="S", help="default: a fresh random seed (printed)")
    gen.add_argument("--num-images", dest="num_images", type=_integer, default=1, metavar="N")
    gen.add_argument("--weighting", metavar="SYNTAX", help='prompt weighting syntax, e.g. "compel"')
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
        "--accelerator", action="append", default=None, metavar="NAME", help="accelerator or preset (repeatable)"
    )
    gen.add_argument("--device", default="auto", help='"auto" (cuda > mps > cpu), cpu, cuda, cuda:N, mps')
    gen.add_argument(
        "--output", "-o", default="t2i.png", metavar="OUT.png", help="output PNG (numbered with --num-images)"
    )
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files")
    gen.add_argument("--allow-pickle", dest="allow_pickle", action="store_true", help="also load .bin (pickle) weights")

    plugins = commands.add_parser("plugins", help="list plugins and what they register", description="List plugins.")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _integer(text: str) -> int:
    """An argparse type; argparse names the flag (``argument --steps: 'x' is not allowed: ...``)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected an integer") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected a number") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 success, 2 a bad argument or request)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: --help, --version, or a usage error already printed
        return int(exit_.code or 0)
    try:
        if args.command == "plugins":
            return _plugins(args)
        return _generate(args)
    except T2IError as exc:
        print(f"t2i: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("t2i: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:
        # A failure t2i did not foresee: still one line, unless the user asks for the traceback.
        if os.environ.get("T2I_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"t2i: internal error: {type(exc).__name__}: {first} (set T2I_DEBUG=1 for the traceback)", file=sys.stderr
        )
        return 1


# -- generate -------------------------------------------------------------------------------


def _key_values(items: list[str], flag: str, what: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidRequestError(flag, item, what)
        values[key.strip()] = value
    return values


_CONTROL_SYNTAX = "IMAGE=MODEL[@SCALE][,start=F][,end=F][,preprocess=NAME][,guess_mode=true|false]"


def _controls(items: list[str]) -> tuple[Any, ...]:
    """Parse ``--control`` values: ``IMAGE=MODEL[@SCALE]`` plus optional ``,key=value`` settings."""
    from .request import Control

    controls = []
    for item in items:
        image, sep, rest = item.partition("=")
        model, *settings = rest.split(",")
        if not sep or not image or not model:
            raise InvalidRequestError("--control", item, _CONTROL_SYNTAX)
        fields: dict[str, Any] = {}
        head, at, tail = model.rpartition("@")
        if at:
            fields["scale"] = _control_number(item, tail)
            model = head
        for setting in settings:
            key, eq, value = setting.partition("=")
            key = key.strip()
            if not eq or key not in ("start", "end", "preprocess", "guess_mode"):
                raise InvalidRequestError("--control", item, _CONTROL_SYNTAX)
            if key in ("start", "end"):
                fields[key] = _control_number(item, value)
            elif key == "guess_mode":
                if value.lower() not in ("true", "false"):
                    raise InvalidRequestError("--control", item, _CONTROL_SYNTAX)
                fields[key] = value.lower() == "true"
            else:
                fields[key] = value
        controls.append(Control(image=image, model=model, **fields))
    return tuple(controls)


def _control_number(item: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidRequestError("--control", item, _CONTROL_SYNTAX + " with numbers for SCALE, start, end") from None


def _output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise InvalidRequestError("--output", output, "a file name ending in .png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index}{path.suffix}") for index in range(count)]


def _check_output(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists (without --overwrite) or cannot be written."""
    try:
        if path.is_dir():
            raise InvalidRequestError("--output", str(path), "a file path (this is a folder)")
        if path.exists() and not overwrite:
            raise InvalidRequestError("--output", str(path), "a path that does not exist yet (or pass --overwrite)")
        if not path.parent.is_dir():
            raise InvalidRequestError("--output", str(path), "a path in an existing folder")
    except OSError as exc:  # e.g. a name too long for the file system
        raise InvalidRequestError("--output", str(path), f"a usable file path ({exc.strerror or exc})") from None
    if not os.access(path.parent, os.W_OK):
        raise InvalidRequestError("--output", str(path), "a path in a folder you can write to")


def _generate(args: argparse.Namespace) -> int:
    from .request import GenerationRequest

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
        controls=_controls(args.control),
        scheduler=args.scheduler,
        options=_key_values(args.option, "--option", "KEY=VALUE"),
    )
    outputs = _output_paths(args.output, request.num_images)
    for path in outputs:
        _check_output(path, args.overwrite)

    _quiet_libraries()
    from .engine import load

    engine = load(
        args.model,
        family=args.family,
        device=args.device,
        accelerators=args.accelerator,
        allow_pickle=args.allow_pickle,
    )
    resolved, _ = engine.resolve(request)  # report bad options before the progress bar starts
    with _progress_bar(resolved.num_inference_steps or 0) as progress:
        result = engine.generate(request, progress=progress)
    for index, path in enumerate(outputs):
        result.save(path, index, overwrite=args.overwrite)
        print(f"{path}  (seed {result.seeds[index]})")
    return 0


def _quiet_libraries() -> None:
    """Keep library chatter (load bars, optional-dependency notices) out of the terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.showwarning = _show_warning
    for library in ("diffusers", "transformers", "huggingface_hub", "torch", "accelerate"):
        warnings.filterwarnings("ignore", module=library)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    _forward_truncation_warnings(diffusers_logging)


class _TruncationOnly(logging.Handler):
    """Prints diffusers' "part of your input was truncated" records as one line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if "truncated" in record.getMessage():
            print(f"t2i: warning: {record.getMessage()}", file=sys.stderr)


def _forward_truncation_warnings(diffusers_logging: Any) -> None:
    """diffusers logs (not warns) when a prompt is cut at the text encoder's length: say so, in one line."""
    logger = diffusers_logging.get_logger("diffusers")
    if any(isinstance(handler, _TruncationOnly) for handler in logger.handlers):
        return
    diffusers_logging.set_verbosity_warning()
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(_TruncationOnly())


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    """Warnings that reach the user (e.g. a truncated prompt) as one line each."""
    print(f"t2i: warning: {message}", file=sys.stderr)


class _progress_bar:
    """A tqdm bar over denoising steps on an interactive terminal; nothing otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, unit="step", file=sys.stderr, leave=False)
        return self._update

    def _update(self, step: int, total: int) -> None:
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.n = step
        self.bar.refresh()

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# -- plugins --------------------------------------------------------------------------------


def _plugins(args: argparse.Namespace) -> int:
    from ._manager import get_registry

    registry = get_registry()
    plugins = []
    for info in registry.plugins.values():
        entry: dict[str, Any] = {
            "name": info.name,
            "distribution": info.distribution,
            "version": info.version,
            "registers": info.registered,
            "error": info.error,
        }
        plugins.append(entry)
    families: dict[str, dict[str, Any]] = {
        name: {
            "aliases": dict(provider.aliases),
            "options": [
                {"name": o.name, "default": o.default, "allowed": o.describe(), "help": o.help}
                for o in provider.options
            ],
            "description": provider.description,
        }
        for name, provider in sorted(registry.providers.items())
    }
    conditioners = {
        name: {"families": list(c.families) if c.families is not None else "all", "description": c.description}
        for name, c in sorted(registry.conditioners.items())
    }
    accelerators = {
        name: {"phase": a.phase, "devices": list(a.devices), "description": a.description}
        for name, a in sorted(registry.accelerators.items())
    }
    presets = {name: {k: list(v) for k, v in p.stacks.items()} for name, p in sorted(registry.presets.items())}
    if args.json:
        document = {
            "plugins": plugins,
            "families": families,
            "conditioners": conditioners,
            "accelerators": accelerators,
            "presets": presets,
        }
        print(json.dumps(document, indent=2, default=str))
        return 0
    for entry in plugins:
        where = f"{entry['distribution']} {entry['version']}" if entry["distribution"] else "registered in-process"
        print(f"{entry['name']}  ({where})")
        if entry["error"]:
            print(f"  ERROR: {entry['error']}")
        for item in entry["registers"]:
            print(f"  {item}")
    print()
    print("families:")
    for name, family in families.items():
        aliases = ", ".join(f"{a} -> {t}" for a, t in family["aliases"].items()) or "none"
        print(f"  {name}: {family['description']}; aliases: {aliases}")
        for option in family["options"]:
            print(
                f"    --option {option['name']}=...  ({option['allowed']}; default {option['default']!r}) {option['help']}"
            )
    print("conditioners:")
    for name, conditioner in conditioners.items():
        fams = conditioner["families"] if conditioner["families"] == "all" else ", ".join(conditioner["families"])
        print(f"  {name}: {conditioner['description']}; families: {fams}")
    print("accelerators:")
    for name, accelerator in accelerators.items():
        print(f"  {name} [{accelerator['phase']}; {', '.join(accelerator['devices'])}]: {accelerator['description']}")
    for name, stacks in presets.items():
        rendered = "; ".join(f"{k}: {'+'.join(v) or '-'}" for k, v in stacks.items())
        print(f"  preset {name}: {rendered}")
    return 0


def console_main() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `t2i plugins | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    raise SystemExit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
