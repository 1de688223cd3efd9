"""The accelerator benchmark runs on CPU (tiny checkpoints) and reports what it claims to."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_accelerators.py"


def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_accelerators", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_run_reports_every_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # main() sets it; undo after
    output = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--tiny", "--steps", "2", "--runs", "2", "--warmup", "0", "--no-warm"]
    argv += [
        "--variants",
        "raw-eager,t2i-auto,t2i:fp32+fuse_qkv+channels_last,t2i:fp32+vae_slicing",
        "--cache-dir",
        str(tmp_path / "inductor"),
    ]
    report = bench().main([*argv, "-o", str(output)])

    assert json.loads(output.read_text()) == report
    environment = report["environment"]
    assert environment["device"] == "cpu" and environment["torch"] and environment["diffusers"]
    family = report["results"]["sd15"]
    assert family["settings"] == {
        "size": 64,
        "steps": 2,
        "batch": 1,
        "guidance_scale": 7.5,
        "dtype": "float32",
        "runs": 2,
        "warmup": 0,
        "scheduler": None,
    }
    records = {r["variant"]: r for r in family["variants"]}
    assert list(records) == ["raw-eager", "t2i-auto", "t2i:fp32+fuse_qkv+channels_last", "t2i:fp32+vae_slicing"]
    for record in records.values():
        assert "error" not in record, record
        assert record["s_per_image"] > 0 and record["cpu_s_per_image"] > 0 and record["runs"] == 2
        assert record["it_per_s"] == pytest.approx(2 / record["s_per_image"], rel=1e-3)
        assert record["ttfi_s"] == pytest.approx(record["load_s"] + record["first_image_s"], abs=1e-3)
        assert record["peak_gpu_memory_gib"] is None
        assert record["image_vs"] == "raw-eager"
    assert records["t2i-auto"]["accelerators"] == ["fp32"]
    assert records["t2i:fp32+fuse_qkv+channels_last"]["accelerators"] == ["fp32", "fuse_qkv", "channels_last"]
    # t2i with auto on CPU is plain fp32: exactly raw diffusers' image.
    assert records["t2i-auto"]["max_abs_diff"] == 0 and records["raw-eager"]["max_abs_diff"] == 0
    assert records["t2i:fp32+fuse_qkv+channels_last"]["max_abs_diff"] <= 1
    assert records["t2i:fp32+vae_slicing"]["max_abs_diff"] == 0
    assert "speedup_vs_raw-eager" in records["t2i-auto"]


def test_unknown_variant_is_refused(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # main() sets it; monkeypatch restores it
    with pytest.raises(SystemExit, match="unknown variant 'turbo'"):
        bench().main(["--device", "cpu", "--tiny", "--variants", "turbo", "--no-warm", "--cache-dir", str(tmp_path)])


def test_a_step_cache_is_compared_with_raw_diffusers_with_the_same_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("t2i_flux")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    argv = ["--device", "cpu", "--tiny", "--family", "flux", "--steps", "8", "--runs", "1", "--warmup", "0"]
    argv += ["--no-warm", "--cache-dir", str(tmp_path), "--variants"]
    argv += ["raw-eager,raw-eager+first-block-cache@0.5,t2i:fp32+first-block-cache@0.5"]
    records = {r["variant"]: r for r in bench().main(argv)["results"]["flux"]["variants"]}
    raw, ours = records["raw-eager+first-block-cache@0.5"], records["t2i:fp32+first-block-cache@0.5"]
    assert raw["accelerators"] == ["float32", "enable_cache(FirstBlockCacheConfig)"]
    assert ours["accelerators"] == ["fp32", "first-block-cache@0.5"]
    assert ours["same_cache_diff"] == {"max_abs_diff": 0, "mean_abs_diff": 0.0}
    assert ours["speedup_vs_raw_same_cache"] > 0 and raw["max_abs_diff"] > 0  # the cache skipped steps
    with pytest.raises(SystemExit, match="unknown step cache in variant 'raw-eager\\+turbo'"):
        bench().main(["--device", "cpu", "--tiny", "--variants", "raw-eager+turbo", "--no-warm"])


def test_configs_build_the_real_architectures() -> None:
    """Parameter counts of the full-size models built from each plugin's architecture/ configs (on the meta device)."""
    import torch

    module = bench()
    # Millions of parameters as published: exact figures for SD1.5/SDXL, Kandinsky's rounded
    # ones (its README: U-Net 1.22B, prior 1B, image encoder 1.8B, MoVQ 67M) with their rounding.
    expected = {
        ("sd15", "unet"): (859.5, 0.002),
        ("sd15", "vae"): (83.65, 0.002),
        ("sd15", "text_encoder"): (123.06, 0.002),
        ("sdxl", "unet"): (2567.5, 0.002),
        ("sdxl", "text_encoder_2"): (694.7, 0.002),
        ("kandinsky22", "unet"): (1220, 0.03),
        ("kandinsky22", "prior_prior"): (1000, 0.03),
        ("kandinsky22", "prior_image_encoder"): (1800, 0.03),
        ("kandinsky22", "movq"): (67, 0.03),
    }
    for (family, component), (millions, tolerance) in expected.items():
        folder = module.architecture(family)
        library, class_name = module.components(json.loads((folder / "model_index.json").read_text()))[component]
        config = module.component_config(folder, component, class_name)
        model = module._build_component(library, class_name, config, Path("unused"), "meta")
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert count == pytest.approx(millions, rel=tolerance), f"{family}/{component}: {count:.1f}M"
        assert next(model.parameters()).device == torch.device("meta")


def test_steady_phase_interleaves_and_reports_ratios(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    output = tmp_path / "steady.json"
    argv = ["--device", "cpu", "--tiny", "--steps", "2", "--runs", "3", "--warmup", "0", "--phase", "steady"]
    argv += ["--variants", "raw-eager,t2i-auto,t2i:fp32+fuse_qkv", "--cache-dir", str(tmp_path / "inductor")]
    report = bench().main([*argv, "-o", str(output)])
    assert json.loads(output.read_text()) == report
    records = {r["variant"]: r for r in report["results"]["sd15"]["variants"]}
    assert list(records) == ["raw-eager", "t2i-auto", "t2i:fp32+fuse_qkv"]
    for name, record in records.items():
        assert record["runs"] == 3 and record["s_per_image"] > 0 and "in_process_first_image_s" in record
        assert "counters_after_warmup" in record
        if name != "raw-eager":
            assert record["speedup_vs_raw-eager"] > 0  # the median of per-round ratios
    assert records["t2i-auto"]["max_abs_diff"] == 0


def test_a_child_that_runs_too_long_is_killed_and_reported(tmp_path: Path) -> None:
    module = bench()
    folders = {"inductor": tmp_path / "i", "triton": tmp_path / "t"}
    result = module.warm_first_image("t2i-auto", "sd15", ["--device", "cpu", "--tiny"], folders, timeout=0.01)
    assert result == {"error": "timed out after 0 s"}


def test_the_memory_estimate_runs_on_fake_tensors() -> None:
    spec = importlib.util.spec_from_file_location("estimate_memory", BENCH.parent / "estimate_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.estimate("sd15", 256)
    assert report["unet_fp16_batch2"]["parameters_gib"] > 1.5  # SD 1.5's 860M-parameter UNet in fp16
    assert 0 < report["unet_fp16_batch2"]["activations_gib"] < 1
    tile, whole = report["vae_decode_fp32_512_tile"], report["vae_decode_fp32_whole_image"]
    assert tile["activations_gib"] >= whole["activations_gib"] > 0  # at 256², one 512 tile is the whole image
    assert report["low_memory_peak_estimate_gib"] < report["without_offload_peak_estimate_gib"]


@pytest.mark.parametrize("family", ["sd15", "sdxl", "kandinsky22"])
def test_architecture_folders_are_in_diffusers_layout(family: str) -> None:
    """What `from_pretrained` and `from_single_file(config=...)` read: model_index.json and a config per component."""
    import diffusers
    import transformers

    folder = bench().architecture(family)
    index = diffusers.DiffusionPipeline.load_config(str(folder))
    assert index["_class_name"] == json.loads((folder / "model_index.json").read_text())["_class_name"]
    for name, (library, class_name) in bench().components(index).items():
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        if library == "diffusers":
            assert cls.load_config(str(folder), subfolder=name), name
        elif class_name.endswith("Tokenizer"):
            assert (folder / name / "tokenizer_config.json").is_file()
        else:
            assert (
                transformers.AutoConfig.from_pretrained(str(folder / name)) if "Processor" not in class_name else True
            )


def test_quantizers_caches_and_turbo_are_compared_with_their_raw_twins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The variants of ``gpu.sh``'s flux-quant and flux-cache pieces, on tiny FLUX.1 and a CPU: each t2i
    stack draws its raw diffusers twin's image; nf4 and fp8 are skipped with the reason."""
    pytest.importorskip("t2i_quantize")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    output = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--tiny", "--family", "flux", "--steps", "2", "--runs", "1", "--warmup", "0"]
    argv += ["--no-warm", "--cache-dir", str(tmp_path / "inductor"), "--variants"]
    argv += [
        "raw-eager,raw-int8,t2i:fp32+int8,raw-nf4,t2i:fp32+nf4,raw-fp8,t2i:fp32+fp8,"
        "raw-eager+first-block-cache@0.2,t2i:fp32+first-block-cache,t2i-turbo"
    ]
    report = bench().main([*argv, "-o", str(output)])

    assert json.loads(output.read_text()) == report
    records = {r["variant"]: r for r in report["results"]["flux"]["variants"]}
    assert not [r for r in records.values() if "error" in r]
    same = {"max_abs_diff": 0, "mean_abs_diff": 0.0}
    assert records["raw-int8"]["accelerators"] == ["float32", "quantization_config=int8"]
    assert records["t2i:fp32+int8"]["accelerators"] == ["fp32", "int8"]
    assert records["t2i:fp32+int8"]["same_quantization_diff"] == same
    assert records["t2i:fp32+int8"]["speedup_vs_raw_same_quantization"] > 0
    assert records["raw-int8"]["max_abs_diff"] > 0  # the weights were quantized: not raw eager's image
    for quantizer in ("nf4", "fp8"):
        assert records[f"raw-{quantizer}"] == {
            "variant": f"raw-{quantizer}",
            "skipped": bench().quantization_problem(quantizer, "cpu"),
        }
        assert "needs a CUDA GPU, not cpu" in records[f"raw-{quantizer}"]["skipped"]
        assert "runs on cuda, not on cpu" in records[f"t2i:fp32+{quantizer}"]["skipped"]
    raw_cache = records["raw-eager+first-block-cache@0.2"]
    assert records["t2i-turbo"]["accelerators"] == ["fp32", "sdpa", "first-block-cache@0.2"]
    for name in ("t2i:fp32+first-block-cache", "t2i-turbo"):
        assert records[name]["same_cache_diff"] == same, name  # the default threshold is raw's 0.2
        assert records[name]["speedup_vs_raw_same_cache"] > 0
        assert records[name]["full_denoiser_calls"] == raw_cache["full_denoiser_calls"]
    assert 1 <= raw_cache["full_denoiser_calls"] <= 2
    assert "full_denoiser_calls" not in records["raw-eager"]


def test_a_saved_checkpoint_lets_full_size_variants_quantize_as_they_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--checkpoint``: random weights built from configs are saved once and every variant loads them
    (tiny FLUX.1's configs stand in for the full-size ones here)."""
    pytest.importorskip("t2i_quantize")
    from t2i_core.testing import tiny_folder

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    module = bench()
    monkeypatch.setattr(module, "architecture", lambda family: Path(tiny_folder(family)))
    checkpoints = tmp_path / "checkpoints"
    argv = ["--device", "cpu", "--family", "flux", "--steps", "2", "--runs", "1", "--warmup", "0", "--no-warm"]
    argv += ["--cache-dir", str(tmp_path / "inductor"), "--variants", "raw-int8,t2i:fp32+int8"]
    with pytest.raises(SystemExit, match="variant 'raw-int8' quantizes as weights load.*--checkpoint DIR"):
        module.main(argv)

    first = module.main([*argv, "--checkpoint", str(checkpoints)])["results"]["flux"]
    folder = checkpoints / "flux-float32"
    assert first["saved_weights"]["path"] == str(folder) and first["saved_weights"]["build_s"] > 0
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not folder.with_name("flux-float32.partial").exists()
    records = {r["variant"]: r for r in first["variants"]}
    assert records["t2i:fp32+int8"]["same_quantization_diff"] == {"max_abs_diff": 0, "mean_abs_diff": 0.0}

    saved = (folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = module.main([*argv, "--checkpoint", str(checkpoints), "--variants", "raw-int8"])["results"]["flux"]
    assert again["saved_weights"] == {"path": str(folder), "reused": True}
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == saved
    assert "error" not in again["variants"][0]
    (tmp_path / "theirs" / "flux-float32").mkdir(parents=True)
    with pytest.raises(SystemExit, match="exists and was not saved by this benchmark"):
        module.main([*argv, "--checkpoint", str(tmp_path / "theirs")])
