"""``t2i serve`` as a real process: SIGTERM stops new work, lets the running job finish, and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from server_support import wait_until

STEPS = 40  # running when SIGTERM comes (sent as soon as it runs), and done well within the timeout


def test_sigterm_finishes_the_running_job_refuses_new_work_and_exits_0() -> None:
    command = [sys.executable, "-m", "t2i_core.cli", "serve", "--model", "tiny:sd15", "--device", "cpu", "--port", "0"]
    command += ["--shutdown-timeout", "120"]
    # One torch thread: the server and this process share the CPU, and torch threads that outnumber
    # the free cores spin-wait (tens of times slower on a busy 2-core machine).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: any("serving" in line for line in lines) or process.poll() is not None, 180, "the server")
        serving = next((line for line in lines if "serving" in line), None)
        assert serving is not None, "".join(lines)
        base = serving.split(" on ", 1)[1].split("/ ", 1)[0]
        assert base.startswith("http://127.0.0.1:")
        client = httpx.Client(base_url=base, timeout=httpx.Timeout(120.0, connect=10.0))
        wait_until(lambda: _healthy(client), 60, "/healthz")
        # Answers leave at once (TCP_NODELAY): with Nagle's algorithm on, each waited ~40 ms for an ACK.
        latencies = []
        for _ in range(10):
            started = time.perf_counter()
            assert client.get("/v1/models").status_code == 200
            latencies.append(time.perf_counter() - started)
        assert sorted(latencies)[5] < 0.03, latencies

        answers: dict[str, Any] = {}

        def generate() -> None:
            with httpx.Client(base_url=base, timeout=180) as own:
                answers["response"] = own.post(
                    "/v1/generations", json={"prompt": "x", "num_inference_steps": STEPS, "seed": 4}
                )

        caller = threading.Thread(target=generate)
        caller.start()
        wait_until(
            lambda: any(job["status"] == "running" for job in client.get("/v1/jobs").json()["jobs"]),
            60,
            "a running job",
        )
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: not _healthy(client), 30, "the server to stop accepting work")
        # While the job drains, the server still answers: /healthz says 503 and new work gets a 503
        # (red team: connections were refused, so probes could not tell draining from gone).
        assert client.get("/healthz").status_code == 503
        refused = client.post("/v1/jobs", json={"prompt": "too late"})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down"
        caller.join(180)
        response = answers["response"]
        assert response.status_code == 200, response.text
        assert response.json()["seeds"] == [4] and len(response.json()["images"]) == 1
        assert process.wait(timeout=120) == 0
        reader.join(10)
        text = "".join(lines)
        assert "stopping (SIGTERM): no new jobs; 1 job(s) get up to 120 s to finish" in text, text
        assert text.rstrip().endswith("t2i serve: stopped"), text
        assert "Traceback" not in text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_a_second_ctrl_c_stops_at_once_without_a_traceback() -> None:
    """Red team: a double Ctrl-C exited 8 s later with two tracebacks."""
    command = [sys.executable, "-m", "t2i_core.cli", "serve", "--model", "tiny:sd15", "--device", "cpu", "--port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: any("serving" in line for line in lines) or process.poll() is not None, 180, "the server")
        base = next(line for line in lines if "serving" in line).split(" on ", 1)[1].split("/ ", 1)[0]
        client = httpx.Client(base_url=base, timeout=httpx.Timeout(60.0, connect=10.0))
        job = client.post("/v1/jobs", json={"prompt": "a long job", "num_inference_steps": 150}).json()
        wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 60, "a running job")
        process.send_signal(signal.SIGINT)
        wait_until(lambda: any("stopping (SIGINT)" in line for line in lines), 30, "the first Ctrl-C")
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
        assert time.monotonic() - started < 15  # the job is cancelled at its next step, not waited for
        reader.join(10)
        text = "".join(lines)
        assert "stopping now (second Ctrl-C)" in text and "Traceback" not in text, text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def _healthy(client: Any) -> bool:
    try:
        return bool(client.get("/healthz").status_code == 200)
    except httpx.TransportError:
        return False


def test_serve_refuses_bad_arguments_in_one_line() -> None:
    """A port in use, a bad limit: one line on stderr, exit 2, before any model loads."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "t2i_core.cli", "serve", "--model", "tiny:sd15", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("t2i: error: --port=") and "a port free on 127.0.0.1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "loading" not in done.stderr
    assert time.monotonic() - started < 60
    bad = subprocess.run(
        [sys.executable, "-m", "t2i_core.cli", "serve", "--model", "tiny:sd15", "--max-steps", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "argument --max-steps: '0' is not allowed: expected an integer >= 1" in bad.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "99999"], "argument --port: '99999' is not allowed: expected an integer in [0, 65535]"),
        (
            ["--shutdown-timeout", "nan"],
            "argument --shutdown-timeout: 'nan' is not allowed: expected a number of seconds >= 0",
        ),
        (["--shutdown-timeout", "inf"], "'inf' is not allowed: expected a number of seconds >= 0"),
        (["--shutdown-timeout", "-5"], "'-5' is not allowed: expected a number of seconds >= 0"),
        (
            ["--host", "no-such-host.invalid"],
            "--host='no-such-host.invalid' is not allowed: expected an address or host name",
        ),
        (["--host", "192.0.2.1"], "--host='192.0.2.1' is not allowed: expected an address of this machine"),
    ],
)
def test_bad_ports_hosts_and_timeouts_are_named_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Red team: --port 99999 was an internal error, --shutdown-timeout took nan, a bad host blamed --port."""
    from t2i_core.cli import main

    assert main(["serve", "--model", "tiny:sd15", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "loading" not in err, err
