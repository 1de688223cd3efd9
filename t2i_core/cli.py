"""The ``t2i`` command line: ``t2i generate`` (also ``--from`` a saved PNG) and ``t2i plugins``,
plus the subcommands that plugins register (``register_commands``, e.g. ``t2i serve``).

Heavy libraries are imported only once a model is loaded, so ``t2i --help`` and
``t2i plugins`` stay instant. Every error the user can fix is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import InvalidRequestError, OutputError, T2IError

if TYPE_CHECKING:
    from .command import Command
    from .engine import Engine
    from .request import GenerationRequest

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"t2i: error: {message} (see t2i --help)\n")


def _parser(
    extra_commands: Mapping[str, Command] | None = None, broken_plugins: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """The ``t2i`` parser: t2i-core's commands, then `extra_commands`, the plugins' (see `_plugin_commands`)."""
    epilog = None
    if broken_plugins:
        epilog = f"plugins that failed to load: {', '.join(broken_plugins)} (t2i plugins says why)"
    parser = _Parser(prog="t2i", description="Text-to-image generation with pluggable model families.", epilog=epilog)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    gen = commands.add_parser(
        "generate", help="generate images from a prompt", description="Generate images from a prompt."
    )
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
    gen.add_argument("--height", type=_integer, metavar="H", help="in pixels, a multiple of 8; default: the model's")
    gen.add_argument("--width", type=_integer, metavar="W", help="in pixels, a multiple of 8; default: the model's")
    gen.add_argument("--steps", type=_integer, metavar="N", help="number of denoising steps")
    gen.add_argument("--guidance-scale", dest="guidance_scale", type=_number, metavar="G", help="default: the family's")
    gen.add_argument("--seed", type=_integer, metavar="S", help="default: a fresh random seed (printed)")
    gen.add_argument(
        "--num-images",
        dest="num_images",
        type=_integer,
        default=1,
        metavar="N",
        help="saved as OUT-0.png, OUT-1.png...",
    )
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
        "--config",
        metavar="C",
        help="for a single-file --model: the diffusers folder, hub id or tiny:<family> with its configs",
    )
    gen.add_argument(
        "--accelerator", action="append", default=None, metavar="NAME", help="accelerator or preset (repeatable)"
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

    plugins = commands.add_parser("plugins", help="list plugins and what they register", description="List plugins.")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")

    warm = commands.add_parser(
        "warmup",
        help="compile a model for some sizes and save the compiled code to a portable file",
        description="Compile MODEL with its compile accelerators for each --size and save torch's portable "
        "compile artefacts to OUT; T2I_COMPILE_ARTIFACTS=OUT in a later process (this machine or another with "
        "the same GPU, torch and model) skips the compilation.",
    )
    warm.add_argument("--model", "-m", required=True, help="hub id, local diffusers folder, alias or tiny:<family>")
    warm.add_argument("--family", help="model family; default: detect from model_index.json")
    warm.add_argument(
        "--accelerator", action="append", required=True, metavar="NAME", help="accelerator or preset (repeatable)"
    )
    warm.add_argument("--device", default="auto", help='"auto" (cuda > mps > cpu), cpu, cuda, cuda:N, mps')
    warm.add_argument(
        "--size", action="append", default=[], metavar="HxW", help="a size to compile for (repeatable); default native"
    )
    warm.add_argument("--num-images", dest="num_images", type=_integer, default=1, metavar="N", help="batch size")
    warm.add_argument("--guidance-scale", dest="guidance_scale", type=_number, metavar="G")
    warm.add_argument("--output", "-o", required=True, metavar="OUT", help="the artefacts file to write")
    warm.add_argument("--overwrite", action="store_true", help="replace an existing OUT")

    plugin = commands.add_parser("plugin", help="tools for plugin authors", description="Tools for plugin authors.")
    plugin_commands = plugin.add_subparsers(dest="plugin_command", metavar="COMMAND", parser_class=_Parser)
    plugin_commands.required = True
    new = plugin_commands.add_parser(
        "new",
        help="write a new plugin package (pyproject, module, README, tests) from a template",
        description="Write t2i-NAME/: a working plugin package whose tests run the conformance kit.",
    )
    new.add_argument("name", metavar="NAME", help="the plugin's name: family, conditioner or accelerator name")
    new.add_argument(
        "--role",
        required=True,
        choices=("provider", "conditioner", "accelerator"),
        help="what the plugin registers: a model family, a conditioner or an accelerator",
    )
    new.add_argument("--dir", default=".", metavar="DIR", help="the folder to write t2i-NAME/ into (default: here)")

    from ._batch_cli import add_batch_command

    add_batch_command(commands)

    for name, command in (extra_commands or {}).items():
        if name not in commands.choices:  # the registry refuses CORE_COMMANDS' names already
            description = command.description or command.help
            parents: list[Any] = [command.parser]  # a plain ArgumentParser; its arguments join a _Parser
            commands.add_parser(name, help=command.help, description=description, parents=parents)
    return parser


def _plugin_commands() -> tuple[dict[str, Command], list[str], str | None]:
    """The subcommands plugins registered, the plugins that failed to load, and the strict-mode error.

    Loading the plugins here never fails the command line: a plugin that broke is listed (and
    ``t2i plugins`` says why); with ``T2I_STRICT_PLUGINS`` set, the error is returned for `main`.
    """
    import warnings

    from ._manager import PluginWarning, get_registry

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)  # t2i plugins lists them
            registry = get_registry()
    except T2IError as exc:
        return {}, [], str(exc)
    return dict(registry.commands), [info.name for info in registry.failures()], None


def _runs_core_command(argv: Sequence[str]) -> bool:
    """Whether `argv` names one of t2i-core's commands: they need no plugin to be parsed."""
    from ._manager import CORE_COMMANDS

    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first in CORE_COMMANDS


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
    argv = sys.argv[1:] if argv is None else list(argv)
    plugin_commands: dict[str, Command] = {}
    if not _runs_core_command(argv):
        plugin_commands, broken, strict_error = _plugin_commands()
        if strict_error is not None and not {"-h", "--help", "--version"} & set(argv):
            print(f"t2i: error: {strict_error}", file=sys.stderr)
            return EXIT_USAGE
        parser = _parser(plugin_commands, broken)
    else:
        parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "generate" and args.from_image is None:
            missing = [name for name, value in (("PROMPT", args.prompt), ("--model/-m", args.model)) if value is None]
            if missing:
                parser.error(f"the following arguments are required: {', '.join(missing)} (or --from IMAGE.png)")
    except SystemExit as exit_:  # argparse: --help, --version, or a usage error already printed
        return int(exit_.code or 0)
    try:
        if args.command in plugin_commands:
            status = plugin_commands[args.command].run(args)
            return 0 if status is None else int(status)
        if args.command == "batch":
            from ._batch_cli import run_batch_command

            return run_batch_command(args)
        if args.command == "plugin":
            return _plugin_new(args)
        if args.command == "plugins":
            return _plugins(args)
        if args.command == "warmup":
            return _warmup(args)
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


def _loras(items: list[str]) -> tuple[Any, ...]:
    """Parse ``--lora SOURCE[@SCALE]``: an ``@`` followed by a number sets the scale.

    A source that exists as given (a path with ``@`` in it) is taken whole.
    """
    from .request import Lora

    loras = []
    for item in items:
        source, at, scale = item.rpartition("@")
        if not at or os.path.exists(item):
            loras.append(Lora(item))
            continue
        try:
            value = float(scale)
        except ValueError:
            if "/" in scale or os.sep in scale:  # an @ inside a path: the whole text is the source
                loras.append(Lora(item))
                continue
            raise InvalidRequestError("--lora", item, "SOURCE[@SCALE] with a number for SCALE") from None
        if not source:
            raise InvalidRequestError("--lora", item, "SOURCE[@SCALE] with a SOURCE")
        loras.append(Lora(source, value))
    return tuple(loras)


def _embeddings(items: list[str]) -> tuple[Any, ...]:
    """Parse ``--embedding SOURCE[=TOKEN]``; a source that exists as given is taken whole."""
    from .request import Embedding

    embeddings = []
    for item in items:
        source, eq, token = item.rpartition("=")
        if not eq or os.path.exists(item):
            embeddings.append(Embedding(item))
            continue
        if not source or not token.strip():
            raise InvalidRequestError("--embedding", item, "SOURCE[=TOKEN] with a SOURCE and a TOKEN after =")
        embeddings.append(Embedding(source, token))
    return tuple(embeddings)


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


def _check_output(path: Path, existing_ok: bool) -> None:
    """Refuse, before any work, an output that exists (unless `existing_ok`) or cannot be written."""
    try:
        if path.is_symlink() and not path.exists():
            raise InvalidRequestError(
                "--output",
                str(path),
                f"a file path, not a dangling symbolic link (to {os.readlink(path)}, which does not exist)",
            )
        if path.is_dir():
            raise InvalidRequestError("--output", str(path), "a file path (this is a folder)")
        if path.exists() and not existing_ok:
            raise InvalidRequestError(
                "--output",
                str(path),
                "a path that does not exist yet (or pass --overwrite, or --skip-existing to keep it)",
            )
        if not path.parent.is_dir():
            raise InvalidRequestError("--output", str(path), "a path in an existing folder")
    except OSError as exc:  # e.g. a name too long for the file system
        raise InvalidRequestError("--output", str(path), f"a usable file path ({exc.strerror or exc})") from None
    if not os.access(path.parent, os.W_OK):
        raise InvalidRequestError("--output", str(path), "a path in a folder you can write to")


def _generate(args: argparse.Namespace) -> int:
    from .request import GenerationRequest

    saved_controls = _apply_saved_run(args) if args.from_image is not None else ()
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
        controls=_controls(args.control) if args.control else saved_controls,
        scheduler=args.scheduler,
        options=_key_values(args.option, "--option", "KEY=VALUE"),
        loras=_loras(args.lora),
        embeddings=_embeddings(args.embedding),
    )
    if args.from_image is not None:
        request = _saved_weights(Path(args.from_image), request, args)
    outputs = _output_paths(args.output, request.num_images)
    for path in outputs:
        _check_output(path, args.overwrite or args.skip_existing)
    kept: dict[int, dict[str, str]] = {}
    if args.skip_existing:
        kept = _kept_outputs(outputs)
        if kept:
            request = _resume(request, kept, outputs, args.model)
        if len(kept) == len(outputs):
            assert request.seed is not None
            for index, path in enumerate(outputs):
                print(f"{path}  (seed {request.seed + index}, kept)")
            print(f"nothing to do: all {len(outputs)} output(s) exist")
            return 0
    missing = [path for index, path in enumerate(outputs) if index not in kept]
    _check_space(missing, _MIN_PNG_BYTES)

    _quiet_libraries()
    from .engine import load

    engine = load(
        args.model,
        family=args.family,
        device=args.device,
        accelerators=args.accelerator,
        allow_pickle=args.allow_pickle,
        config=args.config,
    )
    resolved, _ = engine.resolve(request)  # report bad options before the progress bar starts
    if kept:
        _check_same_run(kept, outputs, resolved, engine)
    _check_space(missing, _png_bound(resolved))
    with _progress_bar(resolved.num_inference_steps or 0) as progress:
        result = engine.generate(request, progress=progress)
    # The whole batch is generated even when some images are kept: image i of a batch equals a
    # lone run of seed s + i only up to rounding, so a smaller batch would not remake it exactly.
    for index, path in enumerate(outputs):
        if index in kept:
            print(f"{path}  (seed {result.seeds[index]}, kept)")
            continue
        try:
            result.save(path, index, overwrite=args.overwrite)
        except OutputError as exc:
            if len(outputs) == 1:
                raise
            hint = f"{exc.reason}; rerun with --skip-existing to make the missing images"
            raise OutputError(exc.path, hint, exc.errno) from None
        print(f"{path}  (seed {result.seeds[index]})")
    return 0


# -- --from: the run saved in a PNG ------------------------------------------------------------

#: PNG text fields (as `GenerationResult.metadata` writes them) that --from reads, with the flag's dest.
_SAVED_FIELDS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "model": "model",
    "seed": "seed",
    "steps": "steps",
    "guidance_scale": "guidance_scale",
    "height": "height",
    "width": "width",
    "scheduler": "scheduler",
    "prompt_weighting": "weighting",
}
_SAVED_NUMBERS: dict[str, Any] = {
    "seed": _integer,
    "steps": _integer,
    "height": _integer,
    "width": _integer,
    "guidance_scale": _number,
}
_IN_MEMORY = "<in-memory image>"


def _apply_saved_run(args: argparse.Namespace) -> tuple[Any, ...]:
    """Fill `args` from the metadata of ``--from IMAGE.png`` where no flag was given; return its controls.

    Flags given on the command line win; ``--option`` values are merged over the saved ones,
    and any ``--control`` replaces every saved control.
    """
    path = Path(args.from_image)
    text = _png_text(path)
    missing = [key for key in ("prompt", "model", "seed") if key not in text]
    if missing:
        raise InvalidRequestError("--from", str(path), f"a PNG saved by t2i (it has no {', '.join(missing)} metadata)")
    model_is_saved = args.model is None
    for key, dest in _SAVED_FIELDS.items():
        if key not in text or getattr(args, dest) is not None:
            continue
        value = text[key]
        if key == "negative_prompt" and not value:
            continue  # t2i writes "" when there was no negative prompt
        try:
            setattr(args, dest, _SAVED_NUMBERS[key](value) if key in _SAVED_NUMBERS else value)
        except argparse.ArgumentTypeError:
            raise InvalidRequestError("--from", str(path), f"a PNG whose {key} is a number, not {value!r}") from None
    if model_is_saved and args.family is None:
        args.family = text.get("family")  # the family the saved model was run as
    saved_options = [f"{key[7:]}={_saved_option(value)}" for key, value in text.items() if key.startswith("option.")]
    args.option = [*saved_options, *args.option]  # later values win: the command line's
    if args.control or "controls" not in text:
        return ()
    return _saved_controls(path, text["controls"])


def _saved_weights(path: Path, request: GenerationRequest, args: argparse.Namespace) -> GenerationRequest:
    """Check ``--lora`` / ``--embedding`` against the LoRAs and embeddings a ``--from`` PNG was made with.

    The PNG names them by file name and content hash, never by path, so they must be given again,
    in the same order; a given file must have the saved content. A ``--lora`` without ``@SCALE``
    (an ``--embedding`` without ``=TOKEN``) takes the saved scale (token).
    """
    import attrs

    from ._weights import describe

    text = _png_text(path)
    changes: dict[str, Any] = {}
    kinds: list[tuple[str, str, tuple[Any, ...], list[str], str]] = [
        ("loras", "--lora", request.loras, args.lora, "scale"),
        ("embeddings", "--embedding", request.embeddings, args.embedding, "token"),
    ]
    for key, flag, given, flags, setting in kinds:
        if key not in text:
            continue
        try:
            saved = [dict(item) for item in json.loads(text[key])]
            files = [(str(item["name"]), str(item["sha256"])) for item in saved]
        except (ValueError, TypeError, KeyError):
            raise InvalidRequestError("--from", str(path), f"a PNG with t2i's {key} metadata") from None
        ours = [describe(item.source, getattr(item, "weight_name", None))["sha256"] for item in given]
        if ours != [digest for _, digest in files]:
            listed = ", ".join(f"{name} (sha256 {digest[:12]})" for name, digest in files)
            raise InvalidRequestError(
                "--from", str(path), f"{flag} for each file it was made with, in this order: {listed}"
            )
        marker = "@" if setting == "scale" else "="
        items = []
        for item, flag_text, entry in zip(given, flags, saved, strict=True):
            explicit = marker in flag_text and not os.path.exists(flag_text)
            items.append(item if explicit else attrs.evolve(item, **{setting: entry[setting]}))
        changes[key] = tuple(items)
    return request.evolve(**changes) if changes else request


def _png_text(path: Path) -> dict[str, str]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {})
    except FileNotFoundError:
        raise InvalidRequestError("--from", str(path), "the path of an existing PNG") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequestError("--from", str(path), f"a PNG saved by t2i (it cannot be read: {exc})") from None
    return {str(key): str(value) for key, value in text.items()}


def _saved_option(value: str) -> str:
    """An option value as ``--option`` takes it; t2i 0.1.0 wrote pairs as Python tuples, ``(512, 512)``."""
    pair = re.fullmatch(r"\(\s*([^()]*?)\s*,?\s*\)", value)
    if pair and re.fullmatch(r"[-+0-9.eE\s,]+", pair.group(1)):
        return ",".join(part.strip() for part in pair.group(1).split(","))
    return value


def _saved_controls(path: Path, text: str) -> tuple[Any, ...]:
    from .request import Control

    try:
        described = json.loads(text)
        if not isinstance(described, list) or not all(isinstance(fields, dict) for fields in described):
            raise ValueError("not a list of controls")
        for index, fields in enumerate(described):
            if fields.get("image") == _IN_MEMORY:
                raise InvalidRequestError(
                    "--from",
                    str(path),
                    f"a PNG whose control images are files (controls[{index}] was an image in memory, "
                    "which the PNG does not hold): pass --control IMAGE=MODEL[@SCALE] with that image",
                )
        return tuple(Control(**fields) for fields in described)
    except T2IError:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError("--from", str(path), f"a PNG with t2i's controls metadata ({exc})") from None


#: Room a PNG needs at the very least: with less free space, t2i refuses before loading the model.
_MIN_PNG_BYTES = 16 * 1024


def _png_bound(request: GenerationRequest) -> int:
    """The most bytes one RGB PNG of `request` with t2i's metadata can take (stored, not compressed)."""
    assert request.height is not None and request.width is not None
    raw = request.height * (request.width * 3 + 1)  # a filter byte per row
    text = len(request.prompt) + len(request.negative_prompt or "")
    return raw + raw // 1000 + 4 * text + 8 * 1024  # deflate's framing; UTF-8 text; chunks and other fields


def _check_space(paths: list[Path], bytes_per_image: int) -> None:
    """Refuse, before the work, to write PNGs into a folder that clearly has no room for them."""
    if not paths:
        return
    folder = paths[0].parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # the folder was checked already; some file systems cannot say
        return
    needed = len(paths) * bytes_per_image
    if free < needed:
        raise OutputError(
            str(paths[0]),
            f"no space left on the device: {_size(free)} free in {folder}, "
            f"{len(paths)} image(s) may need up to {_size(needed)}; nothing was written",
        )


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    value, unit = count / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _kept_outputs(outputs: list[Path]) -> dict[int, dict[str, str]]:
    """For --skip-existing: the outputs that exist, by index, with their PNG text metadata."""
    from PIL import Image

    kept = {}
    for index, path in enumerate(outputs):
        if not path.exists():
            continue
        try:
            with Image.open(path) as image:
                image.load()  # a PNG cut short (by an older t2i, or a copy) fails here
                text = getattr(image, "text", {})
        except (OSError, ValueError, SyntaxError) as exc:
            raise InvalidRequestError(
                "--output",
                str(path),
                f"a complete PNG to keep with --skip-existing (it cannot be read: {exc}); "
                "move it away or pass --overwrite instead",
            ) from None
        kept[index] = {str(key): str(value) for key, value in text.items()}
    return kept


def _resume(
    request: GenerationRequest, kept: dict[int, dict[str, str]], outputs: list[Path], model: str
) -> GenerationRequest:
    """The request that made the kept outputs: without --seed, the seed read from the first of them."""
    first = min(kept)
    seed = request.seed
    if seed is None:
        try:
            seed = int(kept[first]["seed"]) - first
        except (KeyError, ValueError):
            seed = -1
        if seed < 0:
            raise InvalidRequestError(
                "--output",
                str(outputs[first]),
                "a PNG saved by t2i, whose metadata holds its seed, to keep with --skip-existing "
                "(or pass the run's --seed)",
            )
        request = request.evolve(seed=seed)
    for index, text in kept.items():
        identity = {
            "seed": str(seed + index),
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or "",
            "model": model,
        }
        _check_metadata(outputs[index], text, identity)
    return request


def _check_same_run(
    kept: dict[int, dict[str, str]], outputs: list[Path], resolved: GenerationRequest, engine: Engine
) -> None:
    """Every kept output carries exactly the metadata this run would write into it (steps, size, ...)."""
    from .request import GenerationResult

    assert resolved.seed is not None
    seeds = [resolved.seed + index for index in range(len(outputs))]
    expected = GenerationResult(images=[], seeds=seeds, request=resolved, model=engine.model, family=engine.family)
    for index, text in kept.items():
        _check_metadata(outputs[index], text, expected.metadata(index))


def _check_metadata(path: Path, text: dict[str, str], expected: dict[str, str]) -> None:
    for key, value in expected.items():
        if text.get(key) != value:
            found = f"its {key} is {_clip(text[key])}" if key in text else f"it has no {key} in its metadata"
            raise InvalidRequestError(
                "--output",
                str(path),
                f"an image of this same run to keep with --skip-existing, but {found} "
                f"(this run: {_clip(value)}); pass --overwrite to replace it or choose another --output",
            )


def _clip(value: str, limit: int = 60) -> str:
    return repr(value) if len(value) <= limit else repr(value[: limit - 3] + "...")


def _warmup(args: argparse.Namespace) -> int:
    """``t2i warmup``: one short generation per size, then torch's portable compile artefacts to a file."""
    from .request import GenerationRequest

    sizes: list[tuple[int | None, int | None]] = [_size_argument(text) for text in args.size] or [(None, None)]
    out = Path(args.output)
    _check_output(out, args.overwrite)
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
    _quiet_libraries()
    from .builtins.compilation import compile_stats, save_compile_artifacts
    from .engine import load

    engine = load(args.model, family=args.family, device=args.device, accelerators=args.accelerator, cache=False)
    if not any(name.startswith("compile") for name in engine.accelerators):
        allowed = "a compile accelerator or a preset that compiles on " + engine.device
        raise InvalidRequestError("--accelerator", ",".join(args.accelerator), allowed)
    for request in requests:
        resolved, _ = engine.resolve(request)
        engine.generate(request)
        print(f"compiled for {resolved.height}x{resolved.width}, {request.num_images} image(s)")
    kinds = save_compile_artifacts(out, overwrite=args.overwrite)
    stats = compile_stats(engine.pipeline)
    counted = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "no artefacts"
    print(f"{out}  ({out.stat().st_size} bytes: {counted}; compiled models: {', '.join(stats) or 'regional blocks'})")
    return 0


def _size_argument(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    try:
        if not sep:
            raise ValueError(text)
        return int(height), int(width)
    except ValueError:
        raise InvalidRequestError("--size", text, "HEIGHTxWIDTH, e.g. 1024x1024") from None


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
    _prefix_t2i_log_records()


class _OneLine(logging.Handler):
    """Prints t2i's own log records (e.g. an accelerator that changed nothing) as ``t2i: warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno < logging.ERROR else "error"
        print(f"t2i: {level}: {record.getMessage()}", file=sys.stderr)


def _prefix_t2i_log_records() -> None:
    logger = logging.getLogger("t2i")
    if not any(isinstance(handler, _OneLine) for handler in logger.handlers):
        logger.addHandler(_OneLine(level=logging.WARNING))
    logger.propagate = False


class _TruncationOnly(logging.Handler):
    """Prints diffusers' "part of your input was truncated" records as one line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "truncated" in message:
            head, _, dropped = message.partition(": ")
            if len(dropped) > 80:
                dropped = f"{dropped[:80]!r}... ({len(dropped)} characters)"
            print(f"t2i: warning: {head}: {dropped}", file=sys.stderr)


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
    import warnings

    from ._manager import SLOW_IMPORT_SECONDS, PluginWarning, get_registry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # listed below, with the plugin they concern
        registry = get_registry()
    plugins = []
    for info in registry.plugins.values():
        entry: dict[str, Any] = {
            "name": info.name,
            "distribution": info.distribution,
            "version": info.version,
            "source": info.source,
            "entry_point": info.entry_point,
            "module": info.module,
            "location": info.location,
            "import_seconds": None if info.import_seconds is None else round(info.import_seconds, 3),
            "registers": info.registered,
            "warnings": info.warnings,
            "error": info.error,
            "traceback": info.traceback,
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
    executors = {name: {"description": e.description} for name, e in sorted(registry.executors.items())}
    commands = {name: {"help": c.help} for name, c in sorted(registry.commands.items())}
    if args.json:
        document = {
            "plugins": plugins,
            "families": families,
            "conditioners": conditioners,
            "accelerators": accelerators,
            "presets": presets,
            "executors": executors,
            "commands": commands,
        }
        print(json.dumps(document, indent=2, default=str))
        return 0
    for entry in plugins:
        where = f"{entry['distribution']} {entry['version']}" if entry["distribution"] else "registered in-process"
        tag = "" if entry["source"] == "in-process" else f"  {entry['source']}"
        print(f"{entry['name']}  ({where}){tag}")
        if entry["source"] == "third-party" and entry["location"]:
            print(f"  from {entry['location']}")
        if entry["error"]:
            print(f"  ERROR: {entry['error']}")
            if entry["traceback"] and os.environ.get("T2I_DEBUG"):
                print("    " + entry["traceback"].replace("\n", "\n    "))
        for warning in entry["warnings"]:
            print(f"  WARNING: {warning}")
        seconds = entry["import_seconds"]
        if seconds is not None and seconds > SLOW_IMPORT_SECONDS:
            print(f"  SLOW: importing it took {seconds:.1f} s, which delays every t2i command")
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
    print("batch executors:")
    for name, executor in executors.items():
        print(f"  {name}: {executor['description']}")
    print("commands:")
    for name, command in commands.items():
        print(f"  t2i {name}: {command['help']}")
    return 0


def _plugin_new(args: argparse.Namespace) -> int:
    from ._template import create

    folder = create(args.name, args.role, args.dir)
    print(f"wrote {folder}/ ({args.role} plugin); next:")
    print(f'  python -m pip install -e "{folder}[test]" && python -m pytest {folder}')
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
