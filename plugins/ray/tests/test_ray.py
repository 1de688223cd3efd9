"""The ray executor (t2i-ray) on a local Ray cluster of 2 CPUs started by the test: the same files and
manifest as local (SD1.5, and FLUX.1 for the transformer families), and a worker killed mid-batch is
retried with every job written once.

One Ray cluster serves every test here (Ray takes seconds to start). The SD1.5 batch runs on 2 CPU
actors, one of which the test kills (SIGKILL) as soon as it has finished its first job.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from t2i_core import BatchSummary, run_batch
from t2i_core.batch.manifest import MANIFEST

JOBS = [{"id": f"job-{index}", "prompt": f"a lighthouse, view {index}", "num_inference_steps": 8} for index in range(6)]
JOBS[1]["num_images"] = 2
#: a transformer family through the same cluster: a batch, a size, and the family's true CFG option
FLUX_JOBS: list[dict[str, Any]] = [
    {"id": "flux-0", "prompt": "a lighthouse", "num_inference_steps": 2, "num_images": 2},
    {"id": "flux-1", "prompt": "a lighthouse", "num_inference_steps": 2, "height": 48, "width": 80},
    {
        "id": "flux-2",
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "num_inference_steps": 2,
        "options": {"true_cfg_scale": 3.0},
    },
]
#: What may differ between two executors' records of the same job.
RUN_FIELDS = ("timings", "worker", "executor", "finished")


def manifest(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def pngs(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


def run_locally(jobs: list[dict[str, Any]], model: str, out: Path) -> Path:
    """The batch with the local executor, with one torch thread as each of the two actors has."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_batch(jobs, out=out, model=model, device="cpu").ok
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_locally(JOBS, "tiny:sd15", tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """One local Ray cluster of 2 CPUs for every batch of the module (it takes seconds to start)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


#: The title Ray gives the actor processes of the pool; ``.submit`` follows while one runs a job.
ACTOR = "ray::MapWorker(MapBatches(RayWorker))"


def actor_processes() -> dict[int, str]:
    """pid → title of every actor process of the pool."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if title.startswith(ACTOR):
                found[int(entry)] = title
    return found


def busy_actor(timeout: float = 20.0) -> int | None:
    """The pid of an actor of the pool that is making an image now, waiting up to `timeout` seconds for one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [pid for pid, title in actor_processes().items() if title == f"{ACTOR}.submit"]
        if busy:
            return busy[0]
        time.sleep(0.01)
    return None


@pytest.fixture(scope="module")
def ray_run(
    cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, BatchSummary, dict[str, Any]]]:
    """The batch on 2 CPU actors of a local 2-CPU cluster; after the first job, an actor is killed mid-job."""
    out = tmp_path_factory.mktemp("ray")
    killed: dict[str, Any] = {}

    def kill_a_busy_actor(record: Any) -> None:
        if not killed:
            pid = busy_actor()
            killed["pid"] = pid
            killed["actors_before"] = set(actor_processes())
            if pid is not None:
                os.kill(pid, signal.SIGKILL)

    summary = run_batch(
        JOBS,
        out=out,
        model="tiny:sd15",
        executor="ray",
        workers=2,
        executor_options={"stall_timeout": 120},
        on_record=kill_a_busy_actor,
    )
    yield out, summary, killed


@pytest.fixture(scope="module")
def sd15_runs(
    ray_run: tuple[Path, BatchSummary, dict[str, Any]], local_run: Path
) -> tuple[list[dict[str, Any]], Path, BatchSummary, Path]:
    """(jobs, ray's folder, ray's summary, local's folder) of the SD1.5 batch."""
    return JOBS, ray_run[0], ray_run[1], local_run


@pytest.fixture(scope="module")
def flux_runs(
    cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[dict[str, Any]], Path, BatchSummary, Path]:
    """(jobs, ray's folder, ray's summary, local's folder) of the FLUX.1 batch, on the same cluster."""
    out = tmp_path_factory.mktemp("ray-flux")
    summary = run_batch(
        FLUX_JOBS, out=out, model="tiny:flux", executor="ray", workers=2, executor_options={"stall_timeout": 120}
    )
    return FLUX_JOBS, out, summary, run_locally(FLUX_JOBS, "tiny:flux", tmp_path_factory.mktemp("local-flux"))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_ray_writes_the_same_files_and_manifest_as_local(family: str, request: pytest.FixtureRequest) -> None:
    jobs, out, summary, local = request.getfixturevalue(f"{family}_runs")
    images = sum(job.get("num_images", 1) for job in jobs)
    assert (summary.done, summary.failed, summary.images) == (len(jobs), 0, images)
    assert len(pngs(out)) == images and pngs(out) == pngs(local), "ray's images are not bit-exact with local's"

    def comparable(folder: Path) -> dict[str, dict[str, Any]]:
        return {r["id"]: {k: v for k, v in r.items() if k not in RUN_FIELDS} for r in manifest(folder)}

    assert comparable(out) == comparable(local)
    assert {record["executor"] for record in manifest(out)} == {"ray"}


def test_a_killed_worker_is_retried_and_every_job_is_written_once(
    ray_run: tuple[Path, BatchSummary, dict[str, Any]],
) -> None:
    out, summary, killed = ray_run
    assert killed.get("pid") is not None, "no actor was making an image after the first job: nothing to kill"
    records = manifest(out)
    assert sorted(record["id"] for record in records) == [job["id"] for job in JOBS]  # none lost, none twice
    assert all(record["status"] == "done" for record in records) and summary.ok
    # Ray restarted the killed actor (a new process) and ran the job it was making again there.
    pids = {int(record["worker"].rpartition(":")[2]) for record in records}
    assert pids - killed["actors_before"], "no job was made by a restarted actor"


# -- without a cluster: sizing the pool, and never waiting forever ------------------------------


def test_cpu_actors_leave_room_for_ray_data_and_gpu_actors_get_one_gpu_each() -> None:
    from t2i_ray import plan_actors

    from t2i_core import ExecutorSettings, InvalidRequestError

    two_cpus = [{"CPU": 2.0}]
    plan = plan_actors(ExecutorSettings(workers=2), 2.0, 0.0, two_cpus)
    # 2 actors x 1 CPU on 2 CPUs left nothing for Ray Data's tasks, and the batch hung forever.
    assert (plan.actors, plan.num_gpus, plan.device, plan.threads) == (2, 0, "cpu", 1)
    assert plan.actors * plan.num_cpus <= 1.0
    assert plan_actors(ExecutorSettings(), 2.0, 0.0, two_cpus).actors == 1  # one per node by default
    gpus = plan_actors(ExecutorSettings(), 32.0, 4.0, [{"CPU": 16.0, "GPU": 2.0}] * 2)
    assert (gpus.actors, gpus.num_gpus, gpus.device, gpus.threads) == (4, 1, "cuda", None)
    with pytest.raises(InvalidRequestError, match="one GPU per worker"):
        plan_actors(ExecutorSettings(workers=5), 32.0, 4.0, [{"CPU": 16.0, "GPU": 2.0}] * 2)
    with pytest.raises(InvalidRequestError, match="has no GPU"):
        plan_actors(ExecutorSettings(device="cuda"), 2.0, 0.0, two_cpus)


def test_a_pool_that_makes_no_progress_ends_the_batch_instead_of_waiting_forever() -> None:
    import threading

    from t2i_ray import _stream

    from t2i_core import GenerationError

    release = threading.Event()

    class Stuck:
        def iter_rows(self) -> Iterator[dict[str, Any]]:
            release.wait(30)  # an actor pool that is never placed
            return iter(())

    started = time.monotonic()
    try:
        with pytest.raises(GenerationError, match="finished no job for 0.3 s"):
            next(_stream(Stuck(), 0.3))
    finally:
        release.set()
    assert time.monotonic() - started < 5
