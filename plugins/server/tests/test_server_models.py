"""Many models per server: loaded on first use, least recently used evicted under --max-memory, pins kept.

The eviction rules are checked on small stand-in models whose weights' sizes are known; the real
thing (tiny checkpoints over HTTP, images equal to the SDK's) on two families and a --models-dir.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from server_support import decode_png, running_server
from t2i_server import Limits
from t2i_server._jobs import ServedModel, Service, load_model
from t2i_server._models import Models, estimate_bytes, parse_size, scan_folder, weights_bytes

from t2i_core import GenerationRequest, InvalidRequestError, load
from t2i_core.testing import assert_images_equal

TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def stand_in(name: str, source: str, size: int) -> ServedModel:
    """A loaded model whose pipeline holds `size` float32 weights (4 x size bytes)."""
    import torch

    pipeline = SimpleNamespace(components={"unet": torch.nn.Linear(size, 1, bias=False)})
    engine: Any = SimpleNamespace(pipeline=pipeline, device="cpu", source=source)
    return ServedModel(name=name, engine=engine, checker=engine)


def catalog(max_memory: int | None, pinned: tuple[str, ...] = ()) -> tuple[Models, list[str]]:
    loads: list[str] = []
    sizes = {"a": 100, "b": 200, "c": 300, "d": 100}

    def loader(name: str, source: str) -> ServedModel:
        loads.append(name)
        return stand_in(name, source, sizes[name])

    return Models([(n, f"/models/{n}") for n in sizes], loader, max_memory=max_memory, pinned=pinned), loads


def test_models_load_on_first_use_and_the_least_recently_used_idle_one_goes() -> None:
    models, loads = catalog(max_memory=4 * 500)  # a (the default) + room for 400 more floats
    models.get("a")
    models.get("b")
    models.get("d")
    assert loads == ["a", "b", "d"] and set(models.resident()) == {"a", "b", "d"}
    models.get("b")  # b is now more recently used than d
    models.get("c")  # 300 more: d (least recently used) goes, b (used since) too, as 100 + 200 + 300 > 500
    assert set(models.resident()) == {"a", "c"}
    models.hold("c")  # a job waits on c: loading b must not evict it ...
    models.release("c")
    models.get("b")  # ... once released, c is the least recently used idle model
    assert set(models.resident()) == {"a", "b"} and loads == ["a", "b", "d", "c", "b"]
    assert models.get("b") is models.get("b") and loads.count("b") == 2  # resident: no load at all
    assert models.used("cpu") == 4 * 300


def test_pinned_default_and_busy_models_are_never_evicted() -> None:
    models, _loads = catalog(max_memory=4 * 600, pinned=("b",))
    for name in ("a", "b", "d"):
        models.get(name)
    models.hold("d")
    models.entries["c"].nbytes = 4 * 300  # its size, known from an earlier load
    with pytest.raises(Exception, match="does not fit --max-memory while the loaded models are busy"):
        import t2i_server._models as module

        module.WAIT_FOR_MEMORY, saved = 0.0, module.WAIT_FOR_MEMORY
        try:
            models.get("c")  # a (default), b (pinned) and d (busy) hold 400 of 600: 300 more do not fit
        finally:
            module.WAIT_FOR_MEMORY = saved
    assert set(models.resident()) == {"a", "b", "d"}
    models.release("d")
    models.get("c")
    assert set(models.resident()) == {"a", "b", "c"}
    too_big, _ = catalog(max_memory=4 * 250)
    too_big.get("a")
    too_big.entries["c"].nbytes = 4 * 300
    with pytest.raises(InvalidRequestError, match="fits --max-memory"):
        too_big.get("c")


def test_sizes_names_and_folders(tmp_path: Path) -> None:
    assert [parse_size(t) for t in ("1024", "512MiB", "12GB", "1.5 GiB", "2kb")] == [
        1024,
        512 * 2**20,
        12 * 10**9,
        int(1.5 * 2**30),
        2000,
    ]
    for bad in ("", "12XB", "-3", "0", "lots"):
        with pytest.raises(InvalidRequestError, match="--max-memory"):
            parse_size(bad)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "model_index.json").write_text("{}")
    (tmp_path / "one" / "unet").mkdir()
    (tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "one" / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x" * 50)
    (tmp_path / "two.safetensors").write_bytes(b"y" * 30)
    (tmp_path / "three.ckpt").write_bytes(b"z")
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    assert scan_folder(str(tmp_path)) == {"one": str(tmp_path / "one"), "two": str(tmp_path / "two.safetensors")}
    assert "three" in scan_folder(str(tmp_path), allow_pickle=True)
    assert estimate_bytes(str(tmp_path / "one")) == 100  # the fp16 copy is one of the two loaded
    assert estimate_bytes(str(tmp_path / "two.safetensors")) == 30 and estimate_bytes("owner/repo") == 0
    with pytest.raises(InvalidRequestError, match="--models-dir"):
        scan_folder(str(tmp_path / "missing"))


def test_a_models_dir_over_http_loads_evicts_and_reloads_exactly(tmp_path: Path) -> None:
    """The real thing: two models under a cap that holds the default and one more; images equal the SDK's."""
    sd15 = load("tiny:sd15", device="cpu")
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(sd15.source, folder / "copy-of-sd15")
    sdxl_source = load("tiny:sdxl", device="cpu").source

    def loader(name: str, source: str) -> ServedModel:
        return load_model(name, source, device="cpu")

    default = loader("default", "tiny:sd15")
    one = weights_bytes(default.engine.pipeline)
    sdxl_bytes = weights_bytes(load("tiny:sdxl", device="cpu").pipeline)
    sources = [("default", "tiny:sd15"), ("xl", sdxl_source), *scan_folder(str(folder)).items()]
    models = Models(sources, loader, max_memory=one + max(one, sdxl_bytes) + 1024)
    service = Service([default], Limits(), catalog=models)
    body = {"prompt": "a red fox", "num_inference_steps": 2, "seed": 7}
    expected = {
        "copy-of-sd15": sd15.generate(GenerationRequest(**body)).images,
        "xl": load("tiny:sdxl", device="cpu").generate(GenerationRequest(**body)).images,
    }
    with running_server(service) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        listed = {m["name"]: m["loaded"] for m in client.get("/v1/models").json()["models"]}
        assert listed == {"default": True, "xl": False, "copy-of-sd15": False}
        titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert titles == ["default", "xl", "copy-of-sd15"]
        for name in ("xl", "copy-of-sd15", "xl"):
            answer = client.post("/v1/generations", json={**body, "model": name})
            assert answer.status_code == 200, answer.text
            assert_images_equal([decode_png(answer.json()["images"][0])], expected[name])
            loaded = {m["name"] for m in client.get("/v1/models").json()["models"] if m["loaded"]}
            assert loaded == {"default", name}  # the other one was evicted to make room
        assert models.entries["xl"].loads == 2 and models.entries["copy-of-sd15"].loads == 1
        missing = client.post("/v1/generations", json={**body, "model": "nope"})
        assert missing.status_code == 422 and "'copy-of-sd15'" in missing.json()["error"]["message"]


def test_the_switch_benchmark_runs_and_counts_loads() -> None:
    """benchmarks/bench_server_models.py: a switch to an evicted model loads it, to a loaded one does not."""
    import json
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_server_models.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--rounds", "1", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        cwd=bench.parent,
    )
    results = json.loads(done.stdout)["results"]
    assert results["same_model"]["loads"] == results["switch_resident"]["loads"] == 3  # each model once
    assert results["switch_evicted"]["loads"] == 3 + 4  # evicted back and forth: each of the 4 requests loads
    assert all(results[case][name]["median_s"] > 0 for case in results for name in ("xl", "copy"))


def test_a_job_for_a_model_not_loaded_is_queued_at_once_and_says_it_loads() -> None:
    """POST /v1/jobs answers 202 before the model loads; its events start with ``loading``; a bad field
    comes as the job's failure once the model is loaded (422 from the synchronous call); exact images."""
    import json
    import time

    loaded = threading.Event()

    def slow_loader(name: str, source: str) -> ServedModel:
        time.sleep(1.0)
        served = load_model(name, source, device="cpu")
        loaded.set()
        return served

    models = Models([("default", "tiny:sd15"), ("late", "tiny:sd15")], slow_loader)
    models.add(load_model("default", "tiny:sd15", device="cpu"))
    service = Service((), Limits(), catalog=models)
    body = {"prompt": "a red fox", "num_inference_steps": 2, "seed": 7, "model": "late"}
    with running_server(service) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        started = time.perf_counter()
        answer = client.post("/v1/jobs", json=body)
        assert answer.status_code == 202 and time.perf_counter() - started < 1.0 and not loaded.is_set()
        job = answer.json()
        assert job["status"] == "queued" and job["loading"] is True and job["request"] is None
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
            kinds = [json.loads(line[5:])["type"] for line in events.iter_lines() if line.startswith("data:")]
        assert kinds[0] == "loading" and kinds[-1] == "done", kinds
        image = decode_png(client.get(f"/v1/jobs/{job['id']}/images/0").content)
        expected = load("tiny:sd15", device="cpu").generate(
            GenerationRequest(**{k: v for k, v in body.items() if k != "model"})
        )
        assert_images_equal([image], expected.images)
        # Checked once loaded: a bad field fails the job (a 422 from the synchronous call).
        models.entries["late"].served = None  # evicted again: the next request loads it
        bad = client.post("/v1/generations", json={**body, "height": 100})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "height"
