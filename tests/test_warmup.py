"""``t2i warmup``: torch's portable compile artefacts carry a warm start to a fresh machine.

The round trip runs on CPU with inductor, each side in a fresh process with its own empty
t2i cache (so its own empty inductor cache): the second process compiles nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2i_core.cli import main

SECOND_PROCESS = """
from torch._dynamo.utils import counters
from t2i_core import GenerationRequest, load
engine = load({model!r}, device="cpu", accelerators=["fp32", {compile!r}], cache=False)
engine.generate(GenerationRequest(prompt="anything", seed=5, num_inference_steps=2))
inductor = dict(counters["inductor"])
print(inductor.get("fxgraph_cache_hit", 0), inductor.get("fxgraph_cache_miss", 0))
"""


def test_artefacts_from_warmup_skip_compilation_in_a_fresh_process(tmp_path: Path) -> None:
    artefacts = tmp_path / "sd15-vae.compiled"
    # Each process gets its own inductor cache folder (t2i's, under its T2I_CACHE): the second can
    # only hit what the artefacts file brings, never the first process's folder on disk.
    env = {**os.environ, "T2I_CACHE": str(tmp_path / "first"), "HF_HUB_OFFLINE": "1", "T2I_COMPILE_CACHE": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    args = ["--model", "tiny:sd15", "--device", "cpu", "--accelerator", "fp32", "--accelerator", "compile-vae"]
    warm = subprocess.run(
        [sys.executable, "-m", "t2i_core.cli", "warmup", *args, "--size", "64x64", "-o", str(artefacts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert "compiled for 64x64" in warm.stdout and artefacts.stat().st_size > 0
    fresh = {**env, "T2I_CACHE": str(tmp_path / "second"), "T2I_COMPILE_ARTIFACTS": str(artefacts)}
    script = SECOND_PROCESS.format(model="tiny:sd15", compile="compile-vae")
    run = subprocess.run([sys.executable, "-c", script], env=fresh, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    hits, misses = map(int, run.stdout.split()[-2:])
    assert hits > 0 and misses == 0, run.stdout


@pytest.mark.slow  # two processes that compile or trace FLUX.1's blocks on a CPU: about 70 s of CPU time
def test_a_transformer_family_warms_up_its_regional_blocks(tmp_path: Path) -> None:
    """``compile-regional`` on tiny:flux: warmup compiles FLUX.1's two kinds of repeated blocks, and a
    fresh process that loads the artefacts compiles nothing."""
    from support import tiny_folder

    tiny_folder("flux")  # built once in the suite's cache: neither process builds it
    artefacts = tmp_path / "flux-regional.compiled"
    # Each process gets an empty inductor folder of its own; t2i's compile cache stays off.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "first")}
    env.pop("T2I_COMPILE_CACHE", None)
    args = ["--model", "tiny:flux", "--device", "cpu", "--accelerator", "fp32", "--accelerator", "compile-regional"]
    warm = subprocess.run(
        [sys.executable, "-m", "t2i_core.cli", "warmup", *args, "--size", "64x64", "-o", str(artefacts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert "compiled for 64x64" in warm.stdout and "compiled models: regional blocks" in warm.stdout, warm.stdout
    fresh = {**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "second"), "T2I_COMPILE_ARTIFACTS": str(artefacts)}
    script = SECOND_PROCESS.format(model="tiny:flux", compile="compile-regional")
    run = subprocess.run([sys.executable, "-c", script], env=fresh, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    hits, misses = map(int, run.stdout.split()[-2:])
    assert hits > 0 and misses == 0, run.stdout


def test_warmup_needs_a_compile_accelerator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "none.compiled"
    code = main(["warmup", "--model", "tiny:sd15", "--device", "cpu", "--accelerator", "fp32", "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t2i: error: --accelerator='fp32' is not allowed"), err
    assert not out.exists()


def test_warmup_sizes_are_checked_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["warmup", "--model", "tiny:sd15", "--accelerator", "compile", "--size", "big", "-o", str(tmp_path / "x")]
    assert main(args) == 2
    assert "--size='big' is not allowed: expected HEIGHTxWIDTH" in capsys.readouterr().err


def test_a_size_the_family_refuses_stops_warmup_before_any_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUX.1 takes whole 2x2 patches of latents: 72 high is refused, even after a good size, and nothing compiles."""
    from t2i_core import Engine

    def never(*_args: object, **_kwargs: object) -> None:
        pytest.fail("warmup generated (compiled) before every size was checked")

    monkeypatch.setattr(Engine, "generate", never)
    out = tmp_path / "flux.compiled"
    args = ["--model", "tiny:flux", "--device", "cpu", "--accelerator", "fp32", "--accelerator", "compile-regional"]
    assert main(["warmup", *args, "--size", "64x64", "--size", "72x64", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t2i: error: height=72 is not allowed: expected a multiple of 16"), err
    assert not out.exists()


def test_a_foreign_artefacts_file_is_a_clear_error(tmp_path: Path) -> None:
    from t2i_core import ModelNotFoundError
    from t2i_core.builtins.compile import load_compile_artifacts

    junk = tmp_path / "junk.compiled"
    junk.write_bytes(b"not torch's cache")
    with pytest.raises(ModelNotFoundError, match="not a compile artefacts file"):
        load_compile_artifacts(junk)
    with pytest.raises(ModelNotFoundError, match="cannot be read"):
        load_compile_artifacts(tmp_path / "missing.compiled")
