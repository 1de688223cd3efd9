"""t2i batch / run_batch with the local executor: outputs, manifest, resuming, failures, inputs, micro-batching."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from t2i_core import GenerationRequest, InvalidRequestError, run_batch
from t2i_core.batch.jobs import build_request, derived_seed
from t2i_core.batch.manifest import MANIFEST, locked
from t2i_core.cli import main
from t2i_core.testing import assert_images_close, assert_images_equal

STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One thread, as every worker of these tests: on a CPU the thread count is part of the computation."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines() if line.strip()]


def pngs(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


def test_each_image_is_a_png_named_by_its_job_with_generate_metadata_and_a_manifest_record(
    tmp_path: Path, sd15_engine: Any
) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        [
            {"id": "cat", "prompt": "a red cat", "negative_prompt": "blurry"},
            {"prompt": "a blue dog", "num_images": 2, "seed": 7},
        ],
    )
    out = tmp_path / "out"
    summary = run_batch(jobs, out=out, model="tiny:sd15", defaults={"num_inference_steps": STEPS}, device="cpu")
    assert (summary.done, summary.skipped, summary.failed, summary.invalid, summary.images) == (2, 0, 0, 0, 3)
    cat, dog = records(out)
    dog_id = dog["id"]
    assert len(dog_id) == 16 and set(pngs(out)) == {"cat.png", f"{dog_id}-0.png", f"{dog_id}-1.png"}
    # A job without a seed gets one derived from its id; the files are what generate() + save() make.
    assert cat["seeds"] == [derived_seed("cat")] and dog["seeds"] == [7, 8]
    for record in (cat, dog):
        request = build_request(record["request"])
        result = sd15_engine.generate(request)
        assert record["status"] == "done" and record["model"] == "tiny:sd15" and record["family"] == "sd15"
        assert record["request"]["num_inference_steps"] == STEPS and record["request"]["height"] == 64
        for index, entry in enumerate(record["files"]):
            data = (out / entry["name"]).read_bytes()
            assert data == result.png(index), f"{entry['name']} is not what generate() and save() make"
            assert entry["bytes"] == len(data)
        assert {"generate_s", "encode_s", "write_s"} <= set(record["timings"])
    with Image.open(out / "cat.png") as image:
        assert image.text["negative_prompt"] == "blurry" and image.text["seed"] == str(derived_seed("cat"))  # type: ignore[attr-defined]
    # Two local threads (each its own engine over the shared weights) write the same files.
    threaded = tmp_path / "threaded"
    run_batch(jobs, out=threaded, model="tiny:sd15", defaults={"num_inference_steps": STEPS}, device="cpu", workers=2)
    assert pngs(threaded) == pngs(out)


def test_a_rerun_skips_verified_jobs_and_redoes_damaged_missing_and_failed_ones(tmp_path: Path) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        [{"id": f"j{index}", "prompt": f"a lighthouse, view {index}"} for index in range(4)]
        + [{"id": "bad", "prompt": "x", "options": {"no_such_option": 1}}],
    )
    out = tmp_path / "out"
    kwargs: dict[str, Any] = {
        "out": out,
        "model": "tiny:sd15",
        "defaults": {"num_inference_steps": STEPS},
        "device": "cpu",
    }
    first = run_batch(jobs, **kwargs)
    assert (first.done, first.failed) == (4, 1)
    made = pngs(out)
    (out / "j0.png").write_bytes(made["j0.png"][:100])  # cut short by something else
    (out / "j1.png").unlink()
    damaged = bytearray(made["j2.png"])
    damaged[-20] ^= 1  # same size, another checksum
    (out / "j2.png").write_bytes(bytes(damaged))
    # What a SIGKILL can leave: a temporary file and a torn last manifest line.
    (out / ".j3.png.0123abcd.tmp").write_bytes(b"half a png")
    with open(out / MANIFEST, "ab") as manifest:
        manifest.write(b'{"id": "j3", "status": "do')
    lines_before = len((out / MANIFEST).read_text().splitlines())

    second = run_batch(jobs, **kwargs)
    assert (second.done, second.skipped, second.failed) == (3, 1, 1)
    assert pngs(out) == made  # the same bytes again: seeds come from the ids
    assert not list(out.glob(".*.tmp"))
    lines = (out / MANIFEST).read_text().splitlines()
    assert len(lines) == lines_before + 4 and lines[lines_before - 1] == '{"id": "j3", "status": "do'
    third = run_batch(jobs, **kwargs)
    assert (third.done, third.skipped, third.failed) == (0, 4, 1)
    # A job whose line changed is a new job under the same id: it is made again.
    write_lines(jobs, [{"id": "j0", "prompt": "a lighthouse at night"}])
    assert run_batch(jobs, **kwargs).done == 1


def test_failures_are_isolated_recorded_and_the_exit_status_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        [
            {"id": "ok", "prompt": "a cat"},
            "{not json",
            {"prompt": "a cat", "height": 100},
            {"prompt": "a cat", "colour": "red"},
            {"id": "ok", "prompt": "the same id"},
            {"id": "../escape", "prompt": "a cat"},
            {"id": "sampler", "prompt": "a cat", "scheduler": "no-such-scheduler"},
            {"id": "nomodel", "prompt": "a cat", "model": str(tmp_path / "missing")},
            {"id": "also-ok", "prompt": "a dog"},
        ],
    )
    out = tmp_path / "out"
    code = main(
        ["batch", str(jobs), "--model", "tiny:sd15", "--out", str(out), "--steps", str(STEPS), "--device", "cpu"]
    )
    assert code == 3
    captured = capsys.readouterr()
    assert "done 2, skipped 0, failed 2, invalid 5 (of 9 jobs)" in captured.out
    assert "line 2:" in captured.err and "height=100" in captured.err and "colour='red'" in captured.err
    assert "line 5 (id 'ok'): id='ok'" in captured.err and "line 6" in captured.err
    assert "scheduler='no-such-scheduler'" in captured.err and "missing" in captured.err
    by_line = {record["line"]: record for record in records(out)}
    assert [by_line[line]["status"] for line in range(1, 10)] == [
        "done", "invalid", "invalid", "invalid", "invalid", "invalid", "failed", "failed", "done"
    ]  # fmt: skip
    assert by_line[8]["error"]["type"] == "ModelNotFoundError"
    assert set(pngs(out)) == {"ok.png", "also-ok.png"}
    # Usage errors are one line and exit 2, before any work.
    assert main(["batch", str(jobs), "--model", "tiny:sd15", "--out", str(out), "--executor", "spark"]) == 2
    assert "executor='spark' is not allowed: expected one of local" in capsys.readouterr().err
    assert main(["batch", str(jobs), "--out", str(out), "--ray-address", "auto"]) == 2
    assert main(["batch", str(tmp_path / "nope.jsonl"), "--model", "tiny:sd15", "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 2


def test_csv_and_text_inputs_take_the_command_line_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "jobs.csv"
    csv.write_text('id,prompt,seed,num_inference_steps,option.no_such\nc1,a cat,3,,\nc2,"a dog, running",,1,\n')
    text = tmp_path / "prompts.txt"
    text.write_text("# my prompts\na cat\n\na dog\na cat\n")
    out = tmp_path / "out"
    assert main(["batch", str(csv), "-m", "tiny:sd15", "-o", str(out), "--steps", str(STEPS), "--device", "cpu"]) == 0
    assert main(["batch", str(text), "-m", "tiny:sd15", "-o", str(out), "--steps", "1", "--height", "32"]) == 0
    c1, c2, *prompts = records(out)
    assert c1["id"] == "c1" and c1["seeds"] == [3] and c1["request"]["num_inference_steps"] == STEPS
    assert c2["request"]["prompt"] == "a dog, running" and c2["request"]["num_inference_steps"] == 1
    assert [record["request"]["prompt"] for record in prompts] == ["a cat", "a dog", "a cat"]
    assert all(record["request"]["height"] == 32 for record in prompts)
    assert len({record["id"] for record in prompts}) == 3  # a prompt listed twice is two jobs, two seeds
    assert "done 3, skipped 0, failed 0, invalid 0 (of 3 jobs)" in capsys.readouterr().out
    # A CSV header naming no field is refused as a whole; a text file needs --model.
    csv.write_text("prompt,colour\na cat,red\n")
    assert main(["batch", str(csv), "-m", "tiny:sd15", "-o", str(out)]) == 2
    assert main(["batch", str(text), "-o", str(out)]) == 2


def test_dry_run_checks_every_line_against_its_family_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "a cat"},
            {"prompt": "a cat", "scheduler": "euler"},
            {"prompt": "a cat", "model": "tiny:kandinsky22", "scheduler": "euler"},
            {"prompt": "a cat", "options": {"refiner": "x"}},
            {"prompt": "a cat", "guidance_scale": 1000},
            {"prompt": "a cat", "prompt_weighting": "nope"},
        ],
    )
    out = tmp_path / "out"
    assert main(["batch", str(jobs), "--model", "tiny:sd15", "--out", str(out), "--dry-run"]) == 3
    printed = capsys.readouterr().out
    assert "tiny:sd15 (sd15): 2 job(s), 2 image(s); 2 to make, 0 complete" in printed
    for line, error in (
        (3, "scheduler='euler' is not allowed: expected one of the schedulers family 'kandinsky22' can run"),
        (4, "options['refiner']"),
        (5, "guidance_scale=1000"),
        (6, "prompt_weighting='nope'"),
    ):
        assert re.search(rf"invalid: line {line} \(id '\w+'\): {re.escape(error)}", printed), (line, printed)
    assert "nothing was made" in printed
    assert not out.exists()
    write_lines(jobs, [{"prompt": "a cat"}])
    assert main(["batch", str(jobs), "--model", "tiny:sd15", "--out", str(out), "--dry-run"]) == 0
    assert "every job is valid" in capsys.readouterr().out


def test_micro_batches_match_lone_images_within_one_level(tmp_path: Path, sd15_engine: Any) -> None:
    requests = [
        GenerationRequest(prompt=prompt, negative_prompt=negative, seed=seed, num_inference_steps=STEPS, num_images=2)
        for prompt, negative, seed in (("a red cat", "", 1), ("a blue dog", "blurry", 10), ("a tree", "dark", 20))
    ]
    batched = sd15_engine.generate_batch(requests)
    for request, result in zip(requests, batched, strict=True):
        alone = sd15_engine.generate(request)
        assert result.seeds == alone.seeds and result.request == alone.request
        assert_images_close(result.images, alone.images, max_levels=1, why="one batched call against lone calls")
    # Requests that cannot share a call (other steps) are made one by one: exactly the lone images.
    mixed = [requests[0], requests[1].evolve(num_inference_steps=1)]
    for request, result in zip(mixed, sd15_engine.generate_batch(mixed), strict=True):
        assert_images_equal(result.images, sd15_engine.generate(request).images)

    jobs = [{"prompt": f"a lighthouse, view {index}", "num_inference_steps": STEPS} for index in range(3)]
    jobs.append({"prompt": "a lighthouse", "num_inference_steps": 1})
    out = tmp_path / "out"
    summary = run_batch(jobs, out=out, model="tiny:sd15", micro_batch=2, device="cpu")
    assert summary.done == 4
    assert [record["micro_batch"] for record in records(out)] == [2, 2, 1, 1]
    lone = tmp_path / "lone"
    run_batch(jobs, out=lone, model="tiny:sd15", device="cpu")
    for name in pngs(out):
        with Image.open(out / name) as a, Image.open(lone / name) as b:
            difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
        assert difference <= 1, f"{name}: {difference} levels from its lone image"


def test_one_batch_at_a_time_writes_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with locked(out), pytest.raises(InvalidRequestError, match="no other t2i batch is writing to"):
        run_batch([{"prompt": "a cat"}], out=out, model="tiny:sd15")


def test_sigkill_mid_batch_loses_no_finished_image_and_a_rerun_finishes(tmp_path: Path) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl", [{"id": f"j{index}", "prompt": f"a boat {index}"} for index in range(12)]
    )
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "t2i_core.cli", "batch", str(jobs), "-m", "tiny:sd15", "-o", str(out)]
    process = subprocess.Popen([*command, "--steps", str(STEPS), "--device", "cpu"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if (out / MANIFEST).exists() and (out / MANIFEST).read_text().count('"status":"done"') >= 2:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    recorded = []
    for line in (out / MANIFEST).read_text().splitlines():
        try:
            recorded.append(json.loads(line))
        except ValueError:
            pass  # the line being written when the process died
    assert 2 <= len(recorded) < 12, "the batch was not killed mid-way"
    for record in recorded:  # every recorded image is whole
        for entry in record["files"]:
            with Image.open(out / entry["name"]) as image:
                image.load()
    summary = run_batch(jobs, out=out, model="tiny:sd15", defaults={"num_inference_steps": STEPS}, device="cpu")
    assert summary.skipped >= len(recorded) and summary.done + summary.skipped == 12 and summary.ok
    assert len(pngs(out)) == 12 and not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("name", ["jobs.csv", "jobs.jsonl"])
def test_a_utf8_bom_is_not_part_of_the_first_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """Red team: Excel's "CSV UTF-8" starts with a BOM, which broke the CSV header and JSONL line 1."""
    jobs = tmp_path / name
    body = "id,prompt\nc1,a cat\n" if name.endswith(".csv") else '{"id": "c1", "prompt": "a cat"}\n'
    jobs.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    out = tmp_path / "out"
    assert main(["batch", str(jobs), "--model", "tiny:sd15", "--out", str(out), "--dry-run"]) == 0
    assert "every job is valid" in capsys.readouterr().out


def test_a_link_in_an_images_place_is_replaced_not_written_through(tmp_path: Path) -> None:
    """Red team: a finished PNG replaced by a symbolic link made the rerun overwrite the link's target."""
    jobs = write_lines(tmp_path / "jobs.jsonl", [{"id": "j0", "prompt": "a lighthouse"}])
    out = tmp_path / "out"
    kwargs: dict[str, Any] = {"out": out, "model": "tiny:sd15", "defaults": {"num_inference_steps": 1}}
    assert run_batch(jobs, device="cpu", **kwargs).done == 1
    made = (out / "j0.png").read_bytes()
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's own file")
    (out / "j0.png").unlink()
    (out / "j0.png").symlink_to(precious)
    assert run_batch(jobs, device="cpu", **kwargs).done == 1
    assert precious.read_text() == "the user's own file"
    assert not (out / "j0.png").is_symlink() and (out / "j0.png").read_bytes() == made
