"""``t2i batch JOBS --model M --out DIR``: `t2i_core.run_batch` on the command line (see docs/batch.md).

Exit status: 0 when every job is done (made now or complete already), `EXIT_JOBS_FAILED` when
some job failed or some line is invalid (the others are done and recorded), 2 for a usage error
(nothing ran), 130 when interrupted (what was finished is kept).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from .args import integer, key_values, number
from .logs import quiet_libraries

HELP = "make the images of many jobs (JSONL, CSV or a text file of prompts), resumable"
DESCRIPTION = (
    "Make one PNG per image of every job into DIR, with DIR/manifest.jsonl; a rerun skips "
    "complete jobs and redoes the others. Flags below JOBS give every job the fields it does not set."
)

#: Exit status of a batch in which some jobs failed or some lines are invalid; rerun to retry them.
EXIT_JOBS_FAILED = 3

#: The flags that give every job a request field it does not set itself: flag dest → field.
_DEFAULT_FIELDS = {
    "negative_prompt": "negative_prompt",
    "height": "height",
    "width": "width",
    "steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "seed": "seed",
    "num_images": "num_images",
    "weighting": "prompt_weighting",
    "scheduler": "scheduler",
}


def add_arguments(batch: argparse.ArgumentParser) -> None:
    batch.add_argument(
        "jobs", metavar="JOBS", help="a .jsonl or .csv file of jobs, or a text file of prompts (one a line)"
    )
    batch.add_argument("--model", "-m", help="the model of jobs that name none: hub id, folder, alias or tiny:<family>")
    batch.add_argument("--out", "-o", required=True, metavar="DIR", help="the output folder (made if missing)")
    batch.add_argument("--family", help="the family of jobs that name none; default: detect from model_index.json")
    batch.add_argument(
        "--executor", default="local", metavar="NAME", help="where the jobs run: local (default), ray, ..."
    )
    batch.add_argument("--workers", type=integer, metavar="N", help="how many workers (default: the executor's)")
    batch.add_argument(
        "--ray-address",
        dest="ray_address",
        metavar="A",
        help="with --executor ray: the cluster (default: start one here)",
    )
    batch.add_argument(
        "--executor-option",
        dest="executor_option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an executor setting, e.g. stall_timeout=600 (repeatable)",
    )
    batch.add_argument(
        "--accelerator",
        action="append",
        default=None,
        metavar="NAME[@VALUE]",
        help="accelerator or preset (repeatable); NAME@VALUE gives an accelerator its value: first-block-cache@0.15",
    )
    batch.add_argument("--device", default="auto", help='"auto" (each worker\'s best), cpu, cuda, cuda:N, mps')
    batch.add_argument(
        "--dry-run", dest="dry_run", action="store_true", help="check every job and print the plan; make nothing"
    )
    batch.add_argument(
        "--micro-batch",
        dest="micro_batch",
        type=integer,
        default=1,
        metavar="N",
        help="run up to N jobs that differ only in prompts and seed in one call (default 1: off)",
    )
    batch.add_argument("--negative-prompt", dest="negative_prompt", metavar="TEXT", help="every job's negative prompt")
    batch.add_argument("--height", type=integer, metavar="H", help="every job's height (a multiple of 8)")
    batch.add_argument("--width", type=integer, metavar="W", help="every job's width (a multiple of 8)")
    batch.add_argument("--steps", type=integer, metavar="N", help="every job's number of denoising steps")
    batch.add_argument("--guidance-scale", dest="guidance_scale", type=number, metavar="G", help="every job's guidance")
    batch.add_argument("--seed", type=integer, metavar="S", help="every job's seed (default: derived from its id)")
    batch.add_argument("--num-images", dest="num_images", type=integer, metavar="N", help="images per job")
    batch.add_argument(
        "--weighting",
        "--prompt-weighting",
        dest="weighting",
        metavar="SYNTAX",
        help='every job\'s prompt weighting syntax: "compel", "compel-long", "a1111"',
    )
    batch.add_argument("--scheduler", metavar="NAME", help="every job's sampler: default, ddim, euler, ...")
    batch.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="a family option of every job (repeatable)"
    )


def run(args: argparse.Namespace) -> int:
    from .. import run_batch
    from ..errors import InvalidRequestError

    defaults: dict[str, Any] = {
        field: getattr(args, dest) for dest, field in _DEFAULT_FIELDS.items() if getattr(args, dest) is not None
    }
    options = key_values(args.option, "--option", "KEY=VALUE")
    if options:
        defaults["options"] = options
    executor_options: dict[str, Any] = key_values(args.executor_option, "--executor-option", "KEY=VALUE")
    if args.ray_address is not None:
        if args.executor != "ray":
            raise InvalidRequestError(
                "--ray-address", args.ray_address, "a cluster address together with --executor ray"
            )
        executor_options["address"] = args.ray_address
    report = _Report(args.out)
    try:
        summary = run_batch(
            args.jobs,
            out=args.out,
            model=args.model,
            family=args.family,
            defaults=defaults,
            executor=args.executor,
            workers=args.workers,
            accelerators=args.accelerator,
            device=args.device,
            micro_batch=args.micro_batch,
            executor_options=executor_options,
            dry_run=args.dry_run,
            on_start=report.start,
            on_record=report.record,
        )
    except KeyboardInterrupt:
        report.close()
        print(
            f"t2i: interrupted: {report.finished} job(s) finished and recorded in {args.out}/manifest.jsonl; "
            "run the same command again to make the rest",
            file=sys.stderr,
        )
        return 130
    finally:
        report.close()
    if summary.dry_run:
        _print_plan(summary, args)
    else:
        _print_summary(summary)
    return 0 if summary.ok else EXIT_JOBS_FAILED


class _Report:
    """A tqdm bar over the images to make, with rate and ETA, on an interactive terminal."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.finished = 0
        self.failed = 0
        self.bar: Any = None

    def start(self, jobs: int, images: int) -> None:
        if jobs:
            # Only now, and only with work to do: this imports diffusers (seconds), and a rerun
            # whose jobs are all done has nothing to load.
            quiet_libraries()
        if sys.stderr.isatty() and images:
            from tqdm import tqdm

            self.bar = tqdm(total=images, unit="img", desc="t2i batch", file=sys.stderr, dynamic_ncols=True)

    def record(self, record: Mapping[str, Any]) -> None:
        status = record.get("status")
        if status == "invalid":
            return
        self.finished += 1
        if status != "done":
            self.failed += 1
        if self.bar is not None:
            request = record.get("request") or {}
            self.bar.update(int(request.get("num_images") or 1))
            if self.failed:
                self.bar.set_postfix(failed=self.failed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_summary(summary: Any) -> None:
    for failure in summary.failures:
        print(f"t2i: failed: {failure}", file=sys.stderr)
    print(
        f"done {summary.done}, skipped {summary.skipped}, failed {summary.failed}, invalid {summary.invalid} "
        f"(of {summary.total} jobs): {summary.images} image(s) in {summary.seconds:.1f} s, "
        f"{summary.images_per_second:.2f} images/s; manifest: {summary.out}/manifest.jsonl"
    )


def _print_plan(summary: Any, args: argparse.Namespace) -> None:
    jobs = sum(group["jobs"] for group in summary.groups)
    print(f"plan: {jobs} job(s) from {args.jobs} into {summary.out}/ with executor {summary.executor}")
    for group in summary.groups:
        family = f" ({group['family']})" if group["family"] else ""
        complete = group["jobs"] - group["to_make"]
        print(
            f"  {group['model']}{family}: {group['jobs']} job(s), {group['images']} image(s); "
            f"{group['to_make']} to make, {complete} complete"
        )
    for failure in summary.failures:
        print(f"  invalid: {failure}")
    verdict = "every job is valid" if summary.ok else f"{summary.invalid} invalid line(s)"
    print(f"dry run: {verdict}; nothing was made")
