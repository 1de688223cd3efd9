"""Engines under threads: concurrent loads, one engine shared by many threads, cancellation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from t2i_core import Control, GenerationCancelled, GenerationRequest, load
from t2i_core.testing import assert_images_equal

STEPS = 3


def _concurrent_load_script(cache: bool) -> str:
    return textwrap.dedent(
        f"""
        import threading
        from t2i_core import GenerationRequest, clear_cache, load

        errors, engines = [], []
        barrier = threading.Barrier(3)

        def work():
            barrier.wait()
            try:
                engines.append(load("tiny:sd15", device="cpu", cache={cache}))
            except BaseException as exc:
                errors.append(f"{{type(exc).__name__}}: {{exc}}")

        threads = [threading.Thread(target=work) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        request = GenerationRequest(prompt="a cat", seed=3, num_inference_steps=2)
        images = [engine.generate(request).images[0].tobytes() for engine in engines]
        assert len(set(images)) == 1, "engines loaded at once disagree"
        clear_cache()
        again = load("tiny:sd15", device="cpu", cache=False).generate(request).images[0].tobytes()
        assert again == images[0], "a load after the concurrent ones differs"
        print("ok")
        """
    )


@pytest.mark.parametrize("cache", [True, False])
def test_concurrent_loads_in_a_fresh_process(tmp_path: Path, cache: bool) -> None:
    # A fresh process and an empty tiny cache: the tiny build, the lazy diffusers imports and
    # accelerate's process-wide init_empty_weights patch all race here without t2i's loading lock.
    env = {**__import__("os").environ, "T2I_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", _concurrent_load_script(cache)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_the_cache_holds_one_load_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import t2i_core.engine.loading as engine_module

    engine_module.clear_cache()
    calls: list[str] = []
    real = engine_module._load_pipeline

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_load_pipeline", counting)
    with ThreadPoolExecutor(max_workers=4) as pool:
        engines = list(pool.map(lambda _: load("tiny:sd15", device="cpu"), range(4)))
    assert len(calls) == 1
    assert len({id(engine.pipeline.unet) for engine in engines}) == 1


def test_a_failed_load_leaves_nothing_broken(tmp_path: Path) -> None:
    from t2i_core import ModelNotFoundError

    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError):
        load(str(tmp_path), device="cpu")
    # The next load in the same process works and makes the image of a fresh one.
    request = GenerationRequest(prompt="a cat", seed=1, num_inference_steps=2)
    assert load("tiny:sd15", device="cpu", cache=False).generate(request).images


@pytest.fixture(scope="module")
def control_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _mixed_requests(control_image: Image.Image) -> list[GenerationRequest]:
    from t2i_controlnet import tiny_controlnet_folder

    controlnet = str(tiny_controlnet_folder("sd15"))
    base = GenerationRequest(prompt="a red bicycle", seed=11, num_inference_steps=STEPS)
    return [
        base,
        base.evolve(height=48, width=80, seed=12),
        base.evolve(scheduler="euler", negative_prompt="blurry"),
        base.evolve(scheduler="dpm++-2m", seed=13, num_images=2),
        base.evolve(scheduler="ddim", guidance_scale=1.0),
        base.evolve(prompt="a (red)1.4 bicycle, (blue)0.6 sky", prompt_weighting="compel", negative_prompt="ugly--"),
        base.evolve(controls=(Control(image=control_image, model=controlnet, scale=0.8),), seed=14),
        base.evolve(scheduler="unipc", height=56, width=40, negative_prompt="noise", seed=15),
    ]


def test_one_engine_shared_by_eight_threads_gives_the_sequential_images(control_image: Image.Image) -> None:
    engine = load("tiny:sd15", device="cpu", cache=False)
    requests = _mixed_requests(control_image)
    sequential = [[image.tobytes() for image in engine.generate(r).images] for r in requests]
    barrier = threading.Barrier(8)

    def work(index: int) -> list[list[bytes]]:
        barrier.wait()
        made = []
        for round_ in range(3):
            request = requests[(index + round_) % len(requests)]
            made.append([image.tobytes() for image in engine.generate(request).images])
        return made

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(8)))
    wrong = [
        (index, round_)
        for index, made in enumerate(results)
        for round_, images in enumerate(made)
        if images != sequential[(index + round_) % len(requests)]
    ]
    assert not wrong, f"{len(wrong)} of 24 threaded images differ from the sequential ones: {wrong}"


@pytest.mark.parametrize("how", ["return False", "raise"])
def test_progress_can_cancel_and_the_engine_stays_exact(how: str) -> None:
    engine = load("tiny:sd15", device="cpu", cache=False)
    request = GenerationRequest(prompt="a lighthouse", seed=5, num_inference_steps=4, scheduler="dpm++-2m")
    expected = engine.generate(request).images[0].tobytes()
    seen: list[tuple[int, int]] = []

    def progress(step: int, total: int) -> bool | None:
        seen.append((step, total))
        if step == 2:
            if how == "raise":
                raise GenerationCancelled("stop")
            return False
        return None

    with pytest.raises(GenerationCancelled) as caught:
        engine.generate(request, progress=progress)
    assert seen == [(1, 4), (2, 4)]
    if how == "return False":
        assert (caught.value.step, caught.value.total) == (2, 4)
    assert engine.generate(request).images[0].tobytes() == expected


def test_cancel_from_another_thread() -> None:
    engine = load("tiny:sd15", device="cpu", cache=False)
    request = GenerationRequest(prompt="a lighthouse", seed=5, num_inference_steps=40)
    cancel = threading.Event()
    started = threading.Event()
    steps: list[int] = []

    def progress(step: int, total: int) -> bool:
        steps.append(step)
        started.set()
        return not cancel.is_set()

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(engine.generate, request, progress=progress)
        assert started.wait(60)
        cancel.set()
        with pytest.raises(GenerationCancelled):
            future.result(timeout=60)
    assert steps[-1] < 40
    short = request.evolve(num_inference_steps=2)
    assert (
        engine.generate(short).images[0].tobytes()
        == load("tiny:sd15", device="cpu").generate(short).images[0].tobytes()
    )


@pytest.mark.parametrize(
    ("model", "options"), [("tiny:sdxl", {"refiner": "tiny:sdxl-refiner"}), ("tiny:kandinsky22", {})]
)
def test_multi_stage_providers_cancel_too(model: str, options: dict[str, Any]) -> None:
    engine = load(model, device="cpu", cache=False)
    request = GenerationRequest(prompt="a fox", seed=2, num_inference_steps=4, options=options)
    expected = engine.generate(request).images[0].tobytes()
    with pytest.raises(GenerationCancelled):
        engine.generate(request, progress=lambda step, total: step < 3)
    assert engine.generate(request).images[0].tobytes() == expected


def test_an_engine_runs_every_callers_work_on_its_own_thread() -> None:
    """Issue #20: calls from many threads all run on the engine's one thread (one OpenMP pool), exactly."""
    engine = load("tiny:sd15", device="cpu", cache=False)
    seen: set[str] = set()

    def progress(step: int, total: int) -> None:
        seen.add(threading.current_thread().name)

    requests = [GenerationRequest(prompt=f"a lighthouse {i}", seed=i, num_inference_steps=2) for i in range(4)]
    alone = [engine.generate(request).images for request in requests]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda r: engine.generate(r, progress=progress).images, requests))
    for mine, theirs in zip(together, alone, strict=True):
        assert_images_equal(mine, theirs)
    assert len(seen) == 1 and next(iter(seen)).startswith("t2i-engine")


def test_t2i_warnings_point_at_the_callers_line() -> None:
    """Warnings raised on the engine's thread are raised again in the caller's, at its own line."""
    import warnings

    from t2i_core import PromptTruncatedWarning

    engine = load("tiny:sd15", device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.generate(GenerationRequest(prompt="a lighthouse " * 100, seed=1, num_inference_steps=1))
    (truncated,) = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert truncated.filename == __file__


def test_ctrl_c_in_the_caller_stops_the_run_at_its_next_step() -> None:
    """KeyboardInterrupt reaches the waiting caller at once; the engine's run stops at its next step."""
    import signal

    engine = load("tiny:sd15", device="cpu", cache=False)
    steps: list[int] = []

    def progress(step: int, total: int) -> None:
        steps.append(step)
        if step == 2:
            # What Ctrl-C does: SIGINT to the main thread, which waits for the result.
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    request = GenerationRequest(prompt="a lighthouse", seed=3, num_inference_steps=20)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(request, progress=progress)
    after = engine.generate(request.evolve(num_inference_steps=2))  # waits for the stopped run, then runs
    assert max(steps) < 20  # the interrupted run did not go on to its end
    assert_images_equal(
        after.images, load("tiny:sd15", device="cpu").generate(request.evolve(num_inference_steps=2)).images
    )


def test_the_callers_torch_thread_count_holds_on_the_engines_thread() -> None:
    """OpenMP keeps torch's thread count per thread: the caller's setting is carried to the engine's."""
    import torch

    engine = load("tiny:sd15", device="cpu")
    before = torch.get_num_threads()
    seen: dict[int, set[int]] = {}
    try:
        for call, count in enumerate((1, 2, 1)):
            torch.set_num_threads(count)
            engine.generate(
                GenerationRequest(prompt="x", seed=1, num_inference_steps=1),
                progress=lambda step, total, call=call: seen.setdefault(call, set()).add(torch.get_num_threads()),
            )
    finally:
        torch.set_num_threads(before)
    assert seen == {0: {1}, 1: {2}, 2: {1}}
