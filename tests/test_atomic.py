"""Nothing half-written: atomic PNG saves, --skip-existing, one-line output errors, a self-repairing tiny cache.

Write failures are injected by wrapping the file object PIL's PNG encoder writes to, so that real
PNG bytes reach the disk before the failure, as with a full disk or a Ctrl-C in the middle.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support import run_cli

import t2i_core
from t2i_core import GenerationRequest, GenerationResult, InvalidRequestError, ModelNotFoundError, OutputError
from t2i_core import tiny as tiny_module
from t2i_core.testing import as_array
from t2i_core.tiny import ensure_built

ROOT = Path(__file__).resolve().parent.parent


class _FailingFile:
    """A file object that writes `limit` bytes, then raises `error` (PIL falls back to `write` without `fileno`)."""

    def __init__(self, handle: Any, limit: int, error: BaseException) -> None:
        self.handle = handle
        self.limit = limit
        self.error = error
        self.written = 0

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")

    def write(self, data: bytes) -> int:
        room = self.limit - self.written
        if len(data) > room:
            self.handle.write(bytes(data[:room]))
            self.handle.flush()
            raise self.error
        self.written += len(data)
        return int(self.handle.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


def fail_png_writes(monkeypatch: pytest.MonkeyPatch, error: BaseException, *, limit: int = 200, skip: int = 0) -> None:
    """Make PNG saves fail after `limit` bytes with `error`; the first `skip` saves succeed."""
    real = Image.Image.save
    calls = {"count": 0}

    def save(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        calls["count"] += 1
        if calls["count"] <= skip or isinstance(fp, (str, os.PathLike)):
            return real(self, fp, *args, **kwargs)
        return real(self, _FailingFile(fp, limit, error), *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


@pytest.fixture(scope="module")
def result(sd15_engine: Any) -> GenerationResult:
    request = GenerationRequest(prompt="a cat", seed=3, num_inference_steps=1, num_images=2)
    made: GenerationResult = sd15_engine.generate(request)
    return made


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# -- GenerationResult.save ---------------------------------------------------------------------


def test_interrupted_save_leaves_no_file(
    tmp_path: Path, result: GenerationResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_png_writes(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "cat.png")
    assert names(tmp_path) == []  # neither a truncated cat.png nor a temporary file


def test_interrupted_overwrite_keeps_the_original(
    tmp_path: Path, result: GenerationResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cat.png"
    out.write_bytes(b"the original")
    fail_png_writes(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        result.save(out, overwrite=True)
    assert out.read_bytes() == b"the original"
    assert names(tmp_path) == ["cat.png"]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ENOSPC, "no space left on the device"),
        (errno.EROFS, "the file system is read-only"),
        (errno.EACCES, "permission denied"),
        (errno.EIO, "Input/output error"),
    ],
)
@pytest.mark.parametrize("existing", [False, True])
def test_write_errors_are_output_errors(
    tmp_path: Path, result: GenerationResult, monkeypatch: pytest.MonkeyPatch, code: int, reason: str, existing: bool
) -> None:
    out = tmp_path / "cat.png"
    if existing:
        out.write_bytes(b"the original")
    fail_png_writes(monkeypatch, OSError(code, os.strerror(code)))
    with pytest.raises(OutputError) as caught:
        result.save(out, overwrite=existing)
    error = caught.value
    assert isinstance(error, t2i_core.T2IError) and isinstance(error, OSError)
    assert error.errno == code and error.path == str(out)
    unchanged = "the existing file is unchanged" if existing else "nothing was written"
    assert str(error) == f"output={str(out)!r} cannot be written: {reason}; {unchanged}"
    assert names(tmp_path) == (["cat.png"] if existing else [])
    if existing:
        assert out.read_bytes() == b"the original"


def test_a_real_write_failure_from_the_kernel(tmp_path: Path, result: GenerationResult) -> None:
    """RLIMIT_FSIZE makes write(2) itself fail (EFBIG) part-way, as a full disk does, without root."""
    resource = pytest.importorskip("resource")
    out = tmp_path / "cat.png"
    out.write_bytes(b"the original")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(OutputError) as caught:
            result.save(out, overwrite=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert caught.value.errno == errno.EFBIG
    assert out.read_bytes() == b"the original"
    assert names(tmp_path) == ["cat.png"]


def test_the_temporary_file_is_hidden_beside_the_output(
    tmp_path: Path, result: GenerationResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    real = Image.Image.save

    def save(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(names(tmp_path))
        real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    result.save(tmp_path / "cat.png", 1)
    assert len(seen) == 1 and len(seen[0]) == 1
    assert re.fullmatch(r"\.cat\.png\.[0-9a-f]{8}\.tmp", seen[0][0]), seen
    assert names(tmp_path) == ["cat.png"]
    with Image.open(tmp_path / "cat.png") as image:
        assert image.text["seed"] == "4"  # type: ignore[attr-defined]
        assert (as_array(image.convert("RGB")) == as_array(result.images[1])).all()


def test_a_file_that_appears_during_the_write_is_never_replaced(
    tmp_path: Path, result: GenerationResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cat.png"
    real = Image.Image.save

    def save(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        real(self, fp, *args, **kwargs)
        out.write_bytes(b"someone else's")  # another process takes the name meanwhile

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(InvalidRequestError, match="does not exist yet"):
        result.save(out)
    assert out.read_bytes() == b"someone else's"
    assert names(tmp_path) == ["cat.png"]


def test_file_systems_without_hard_links(
    tmp_path: Path, result: GenerationResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "cat.png"
    result.save(out)
    assert out.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(InvalidRequestError):
        result.save(out)
    assert names(tmp_path) == ["cat.png"]


def test_overwrite_keeps_permissions_and_writes_through_a_link(tmp_path: Path, result: GenerationResult) -> None:
    real = tmp_path / "real.png"
    real.write_bytes(b"old")
    real.chmod(0o640)
    link = tmp_path / "latest.png"
    link.symlink_to(real.name)
    result.save(link, overwrite=True)
    assert link.is_symlink() and real.read_bytes().startswith(b"\x89PNG")
    assert real.stat().st_mode & 0o777 == 0o640
    assert names(tmp_path) == ["latest.png", "real.png"]


def test_a_dangling_link_is_never_followed_without_overwrite(tmp_path: Path, result: GenerationResult) -> None:
    link = tmp_path / "cat.png"
    link.symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(InvalidRequestError):
        result.save(link)
    assert names(tmp_path) == ["cat.png"] and link.is_symlink()


def test_a_long_name_still_gets_a_legal_temporary_name(tmp_path: Path, result: GenerationResult) -> None:
    out = tmp_path / ("c" * 246 + ".png")  # 250 bytes: legal, but not with ".tmp" and a random part added
    result.save(out)
    assert names(tmp_path) == [out.name]


def test_output_error_survives_pickling() -> None:
    import pickle

    error = OutputError("a.png", "no space left on the device; nothing was written", errno.ENOSPC)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.reason, copy.errno, str(copy)) == (error.path, error.reason, error.errno, str(error))


# -- t2i generate: saving ----------------------------------------------------------------------


def generate_args(out: Path, *extra: str) -> list[str]:
    return ["generate", "a cat", "--model", "tiny:sd15", "--steps", "2", "--device", "cpu", "-o", str(out), *extra]


def test_cli_full_disk_while_saving_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_png_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert run_cli(*generate_args(tmp_path / "cat.png")) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"t2i: error: output={str(tmp_path / 'cat.png')!r} cannot be written: no space left on the device; nothing was written\n"
    )
    assert names(tmp_path) == []


def test_cli_interrupted_overwrite_keeps_the_original(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cat.png"
    out.write_bytes(b"precious")
    fail_png_writes(monkeypatch, KeyboardInterrupt())
    assert run_cli(*generate_args(out, "--overwrite")) == 130
    assert out.read_bytes() == b"precious"
    assert names(tmp_path) == ["cat.png"]


class _Usage:
    def __init__(self, free: int) -> None:
        self.total, self.used, self.free = 10**9, 10**9 - free, free


def test_cli_refuses_a_full_disk_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import t2i_core.engine.loading

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(0))
    monkeypatch.setattr(t2i_core.engine.loading, "load", no_load)
    assert run_cli(*generate_args(tmp_path / "cat.png")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on the device: 0 bytes free" in err
    assert names(tmp_path) == []


def test_cli_refuses_too_little_room_before_generating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from t2i_sd15 import StableDiffusion15

    def no_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("images were generated")

    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(50 * 1024))  # more than 3 x 16 KiB
    monkeypatch.setattr(StableDiffusion15, "run", no_run)
    assert run_cli(*generate_args(tmp_path / "cat.png", "--num-images", "3")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "50.0 KiB free" in err and "3 image(s) may need up to" in err
    assert "up to 48.0 KiB" not in err  # the bound for 64x64 images, known once the model is loaded


@pytest.mark.parametrize("overwrite", [False, True])
def test_cli_refuses_a_dangling_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    from t2i_sd15 import StableDiffusion15

    def no_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("images were generated")

    monkeypatch.setattr(StableDiffusion15, "run", no_run)
    link = tmp_path / "cat.png"
    link.symlink_to(tmp_path / "gone.png")
    assert run_cli(*generate_args(link, *(["--overwrite"] if overwrite else []))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--output={str(link)!r}" in err and f"dangling symbolic link (to {tmp_path / 'gone.png'}" in err
    assert names(tmp_path) == ["cat.png"]


def test_cli_model_name_too_long_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = "a" * 300
    assert run_cli("generate", "x", "--model", model, "-o", str(tmp_path / "x.png")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"t2i: error: model={model!r} cannot be loaded: it is neither a local folder nor a hub id")


def test_cli_numbered_name_too_long_is_refused_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("n" * 250 + ".png")  # legal alone, too long once numbered "-0"
    assert run_cli(*generate_args(out, "--num-images", "2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usable file path" in err and "File name too long" in err


# -- t2i generate --skip-existing --------------------------------------------------------------


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return as_array(image.convert("RGB"))


def test_skip_existing_finishes_an_interrupted_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "b.png"
    with monkeypatch.context() as patch:
        fail_png_writes(patch, KeyboardInterrupt(), skip=1)  # Ctrl-C while image 1 is written
        assert run_cli(*generate_args(out, "--num-images", "3", "--seed", "11")) == 130
    assert names(tmp_path) == ["b-0.png"]  # image 0 complete, nothing else
    first = (tmp_path / "b-0.png").read_bytes()
    capsys.readouterr()

    assert run_cli(*generate_args(out, "--num-images", "3", "--skip-existing")) == 0  # the seed comes from b-0.png
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / 'b-0.png'}  (seed 11, kept)",
        f"{tmp_path / 'b-1.png'}  (seed 12)",
        f"{tmp_path / 'b-2.png'}  (seed 13)",
    ]
    assert (tmp_path / "b-0.png").read_bytes() == first

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert run_cli(*generate_args(fresh / "b.png", "--num-images", "3", "--seed", "11")) == 0
    for index in range(3):  # exactly the images of one uninterrupted run
        assert (pixels(tmp_path / f"b-{index}.png") == pixels(fresh / f"b-{index}.png")).all()


def test_skip_existing_with_everything_there_does_no_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import t2i_core.engine.loading

    out = tmp_path / "b.png"
    assert run_cli(*generate_args(out, "--num-images", "2", "--seed", "5")) == 0
    capsys.readouterr()

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(t2i_core.engine.loading, "load", no_load)
    assert run_cli(*generate_args(out, "--num-images", "2", "--skip-existing")) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / 'b-0.png'}  (seed 5, kept)",
        f"{tmp_path / 'b-1.png'}  (seed 6, kept)",
        "nothing to do: all 2 output(s) exist",
    ]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (["--seed", "99"], "its seed is '6' (this run: '100')"),
        (["--negative-prompt", "blurry"], "its negative_prompt is '' (this run: 'blurry')"),
        (["--steps", "3"], "its steps is '2' (this run: '3')"),  # checked once the defaults are known
        (["--guidance-scale", "1.5"], "its guidance_scale is"),
    ],
)
def test_skip_existing_refuses_images_of_another_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: list[str], needle: str
) -> None:
    out = tmp_path / "b.png"
    assert run_cli(*generate_args(out, "--num-images", "3", "--seed", "5")) == 0
    (tmp_path / "b-0.png").unlink()
    kept = (tmp_path / "b-1.png").read_bytes()
    capsys.readouterr()
    assert run_cli(*generate_args(out, "--num-images", "3", "--skip-existing", *change)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--output={str(tmp_path / 'b-1.png')!r}" in err and needle in err, err
    assert "--overwrite" in err
    assert names(tmp_path) == ["b-1.png", "b-2.png"] and (tmp_path / "b-1.png").read_bytes() == kept


def test_skip_existing_refuses_another_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.png"
    assert run_cli(*generate_args(out)) == 0
    capsys.readouterr()
    args = generate_args(out, "--skip-existing")
    args[1] = "a dog"
    assert run_cli(*args) == 2
    assert "its prompt is 'a cat' (this run: 'a dog')" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"not a png", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_skip_existing_refuses_a_file_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    (tmp_path / "b-0.png").write_bytes(content)
    assert run_cli(*generate_args(tmp_path / "b.png", "--num-images", "2", "--skip-existing")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a complete PNG to keep with --skip-existing" in err
    assert (tmp_path / "b-0.png").read_bytes() == content


def test_skip_existing_refuses_a_png_without_a_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "b-0.png")
    assert run_cli(*generate_args(tmp_path / "b.png", "--num-images", "2", "--skip-existing")) == 2
    assert "whose metadata holds its seed" in capsys.readouterr().err


def test_skip_existing_and_overwrite_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(*generate_args(tmp_path / "b.png", "--skip-existing", "--overwrite")) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_full_disk_mid_batch_says_how_to_finish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_png_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), skip=1)
    assert run_cli(*generate_args(tmp_path / "b.png", "--num-images", "2", "--seed", "1")) == 2
    captured = capsys.readouterr()
    assert captured.out == f"{tmp_path / 'b-0.png'}  (seed 1)\n"
    assert captured.err.count("\n") == 1 and captured.err.endswith(
        "rerun with --skip-existing to make the missing images\n"
    )
    assert names(tmp_path) == ["b-0.png"]


# -- tiny checkpoints --------------------------------------------------------------------------


def fake_build(calls: list[Path]) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "model_index.json").write_text('{"_class_name": "Demo"}')
        (folder / "unet").mkdir()
        (folder / "unet" / "weights.safetensors").write_bytes(bytes(range(256)) * 40)

    return build


def truncate(folder: Path) -> None:
    weights = folder / "unet" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def flip_a_byte(folder: Path) -> None:
    weights = folder / "unet" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[500] ^= 0xFF
    weights.write_bytes(bytes(data))


def remove_component(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder / "unet")


def older_t2i_marker(folder: Path) -> None:
    (folder / ".complete").write_text("ok\n")


@pytest.mark.parametrize(
    "damage",
    [
        truncate,
        flip_a_byte,
        remove_component,
        lambda folder: (folder / "model_index.json").unlink(),
        lambda folder: (folder / ".complete").unlink(),
        older_t2i_marker,
    ],
    ids=["truncated", "changed", "component-missing", "model-index-missing", "marker-missing", "old-marker"],
)
def test_damaged_tiny_checkpoint_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: Callable[[Path], None]
) -> None:
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_module.cache, "_verified", set())
    calls: list[Path] = []
    build = fake_build(calls)
    folder = ensure_built("demo", 1, build)
    good = (folder / "unet" / "weights.safetensors").read_bytes()
    damage(folder)
    monkeypatch.setattr(tiny_module.cache, "_verified", set())  # as in a new process
    assert ensure_built("demo", 1, build) == folder
    assert len(calls) == 2
    assert (folder / "unet" / "weights.safetensors").read_bytes() == good
    assert json.loads((folder / ".complete").read_text())["files"]["model_index.json"]["size"] == 23
    assert names(tmp_path / "tiny") == ["demo-v1"]  # the damaged copy is gone too
    assert ensure_built("demo", 1, build) == folder and len(calls) == 2


def test_damaged_real_checkpoint_is_rebuilt_and_makes_the_same_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sd15_engine: Any
) -> None:
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    fresh = t2i_core.load("tiny:sd15", device="cpu", cache=False)  # builds into tmp_path
    assert fresh.source == str(tmp_path / "tiny" / "sd15-v1") != sd15_engine.source
    weights = tmp_path / "tiny" / "sd15-v1" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    engine = t2i_core.load("tiny:sd15", device="cpu", cache=False)
    request = GenerationRequest(prompt="a cat", seed=1, num_inference_steps=2)
    assert (as_array(engine.generate(request).images[0]) == as_array(sd15_engine.generate(request).images[0])).all()


def test_a_damaged_checkpoint_that_cannot_be_moved_names_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    folder = ensure_built("demo", 1, fake_build([]))
    truncate(folder)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(ModelNotFoundError) as caught:
        ensure_built("demo", 1, fake_build([]))
    message = str(caught.value)
    assert message.startswith("model='tiny:demo' cannot be loaded: its cached checkpoint is damaged")
    assert "unet/weights.safetensors has 100 bytes instead of 10240" in message
    assert message.endswith(f"(Permission denied); delete the folder {folder} and try again")


def test_a_build_that_runs_out_of_space_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))

    def build(folder: Path) -> None:
        (folder / "half").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(InvalidRequestError, match=r"\$T2I_CACHE=.*\(No space left on device\)"):
        ensure_built("demo", 1, build)
    assert names(tmp_path / "tiny") == []


def test_another_process_finishing_first_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    calls: list[Path] = []
    inner = fake_build(calls)

    def build(folder: Path) -> None:
        inner(folder)
        ensure_built("demo", 1, inner)  # the other process wins the rename

    assert ensure_built("demo", 1, build) == tmp_path / "tiny" / "demo-v1"
    assert len(calls) == 2
    assert names(tmp_path / "tiny") == ["demo-v1"]


def test_stale_staging_folders_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    tiny = tmp_path / "tiny"
    for name in (".demo-dead1234", ".demo-live5678", ".other-dead0000"):
        (tiny / name).mkdir(parents=True)
        (tiny / name / "weights").write_bytes(b"x")
    hour_ago = time.time() - 3600
    for name in (".demo-dead1234", ".other-dead0000"):
        for path in (tiny / name / "weights", tiny / name):
            os.utime(path, (hour_ago, hour_ago))
    ensure_built("demo", 1, fake_build([]))
    # a build that died an hour ago is cleared; one still writing, and other names, are left alone
    assert names(tiny) == [".demo-live5678", ".other-dead0000", "demo-v1"]


def test_a_build_leaves_the_sigterm_handler_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build installs no signal handler: the application's own gets SIGTERM, and the build goes on."""
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    received: list[int] = []
    during: list[Any] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)

    inner = fake_build([])

    def build(folder: Path) -> None:
        during.append(signal.getsignal(signal.SIGTERM))
        os.kill(os.getpid(), signal.SIGTERM)
        inner(folder)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        folder = ensure_built("demo", 1, build)
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert during == [handler] and received == [signal.SIGTERM]
    assert names(tmp_path / "tiny") == ["demo-v1"] and (folder / ".complete").is_file()


_BUILD_THEN_WAIT = """
import sys, time
from pathlib import Path
from t2i_core import get_registry
from t2i_core.tiny import ensure_built

provider = get_registry().provider("sd15")

def build(folder):
    provider.build_tiny(folder)
    Path(sys.argv[1]).write_text("built, not yet renamed")
    time.sleep(120)

ensure_built(provider.name, provider.tiny_version, build)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_build_killed_mid_way_is_cleaned_up_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """A killed build leaves its staging folder (no handler runs); the next build removes it and builds anew."""
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    env = {**os.environ, "T2I_CACHE": str(cache)}
    process = subprocess.Popen([sys.executable, "-c", _BUILD_THEN_WAIT, str(marker)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert process.poll() is None, "the build process ended early"
            assert time.monotonic() < deadline, "the build did not get going"
            time.sleep(0.1)
        staging = names(cache / "tiny")
        assert len(staging) == 1 and staging[0].startswith(".sd15-build-")  # mid-build: only the staging folder
        assert staging[0].split("-")[-2] == str(process.pid)  # named after its builder
        process.send_signal(signum)
        assert process.wait(timeout=60) == -signum  # ends as the signal asks: nothing intercepts it
    finally:
        if process.poll() is None:
            process.kill()
    assert names(cache / "tiny") == staging  # complete files, but never renamed into place

    monkeypatch.setenv("T2I_CACHE", str(cache))
    calls: list[Path] = []
    folder = ensure_built("sd15", 1, fake_build(calls))  # the builder is gone: its leftovers go
    assert len(calls) == 1 and names(cache / "tiny") == ["sd15-v1"]
    assert names(folder) == [".complete", "model_index.json", "unet"]  # this build's files, nothing of the dead one
