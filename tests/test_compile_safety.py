"""The compiled call's promises, checked on CPU: CUDA-graph outputs safe to keep, no recompile
for a timestep dtype, visible recompiles, the CUDA-graph choices per family and pipeline, and no
process-wide state changed by loading or running a compiled engine.

CUDA graphs do not exist on a CPU, so `cuda_graph_like` stands in for their one property that
matters here: every replay writes its output into the same static buffer. Without the clone a
scheduler that keeps past model outputs (PNDM's ``ets``, DPM-Solver's ``model_outputs``) reads
overwritten values and the image changes; with it, every scheduler gives the uncompiled image.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from t2i_core import GenerationRequest, LoadContext, load, schedulers
from t2i_core.builtins.compile import INDUCTOR_TUNING, accelerators, calls

STEPS = 3


def cuda_graph_like(function: Any, options: dict[str, Any]) -> Any:
    """Runs `function` eagerly and returns its outputs in one static buffer per output, as CUDA graph replays do."""
    import torch

    static: dict[int, Any] = {}

    def into_static(index: int, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        buffer = static.get(index)
        if buffer is None or buffer.shape != value.shape:
            buffer = static[index] = torch.empty_like(value)
        buffer.copy_(value)
        return buffer

    def replay(*args: Any, **kwargs: Any) -> Any:
        output = function(*args, **kwargs)
        if isinstance(output, tuple):
            return tuple(into_static(i, v) for i, v in enumerate(output))
        if isinstance(output, dict):
            return type(output)(**{k: into_static(i, v) for i, (k, v) in enumerate(output.items())})
        return into_static(0, output)

    return replay


@pytest.fixture
def plain() -> Any:
    return load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)


def compiled_engine(monkeypatch: pytest.MonkeyPatch, *, clone: bool) -> Any:
    """A tiny SD 1.5 engine whose UNet runs through `CompiledCall` with `cuda_graph_like` replays."""
    engine = load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)
    monkeypatch.setattr(calls, "compile_function", cuda_graph_like)
    call = calls.install_compiled(engine.pipeline.unet, "unet", {"mode": "reduce-overhead"}, normalise_timestep=True)
    if not clone:
        call.cuda_graphs = False  # what t2i did before: hand the static buffer straight to the scheduler
    return engine


def generate(engine: Any, **fields: Any) -> bytes:
    fields.setdefault("num_inference_steps", STEPS)
    fields.setdefault("seed", 3)
    return engine.generate(GenerationRequest(prompt="a lighthouse", **fields)).images[0].tobytes()


def test_reused_outputs_break_a_scheduler_that_keeps_them(monkeypatch: pytest.MonkeyPatch, plain: Any) -> None:
    """The hazard is real: without the clone, PNDM (SD 1.5's default) makes another image."""
    engine = compiled_engine(monkeypatch, clone=False)
    assert generate(engine, guidance_scale=1.0) != generate(plain, guidance_scale=1.0)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_every_scheduler_gets_its_exact_image_from_cuda_graph_outputs(
    monkeypatch: pytest.MonkeyPatch, plain: Any, guidance_scale: float
) -> None:
    marks: list[int] = []
    import torch

    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    engine = compiled_engine(monkeypatch, clone=True)
    call = calls.compiled_call(engine.pipeline.unet)
    assert call is not None
    for name in schedulers.names():
        marks.clear()
        calls_before = call.calls
        size = {"height": 32, "width": 32}  # 4x4 latents: ten schedulers in seconds
        ours = generate(engine, scheduler=name, guidance_scale=guidance_scale, **size)
        assert ours == generate(plain, scheduler=name, guidance_scale=guidance_scale, **size), name
        assert len(marks) == call.calls - calls_before > 0, "each UNet call starts a new CUDA-graph step"


def test_each_call_marks_a_step_and_clones(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    engine = compiled_engine(monkeypatch, clone=True)
    unet = engine.pipeline.unet
    sample = torch.zeros(1, 4, 8, 8)
    text = torch.zeros(1, 77, 32)
    first = unet(sample, torch.tensor(10), encoder_hidden_states=text, return_dict=False)[0]
    second = unet(sample + 1, torch.tensor(20), encoder_hidden_states=text, return_dict=False)[0]
    assert len(marks) == 2
    assert first.data_ptr() != second.data_ptr() and not torch.equal(first, second)


@pytest.fixture
def eager_dynamo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Real dynamo tracing and guards, with the eager backend instead of inductor (seconds, not minutes)."""
    import torch

    def traced(function: Any, options: dict[str, Any]) -> Any:
        return torch.compile(function, backend="eager", dynamic=options.get("dynamic"))

    monkeypatch.setattr(calls, "compile_function", traced)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_recompiles_are_warned_with_their_cause_and_counted(eager_dynamo: None, plain: Any) -> None:
    engine = load("tiny:sd15", device="cpu", accelerators=["fp32", "compile"], cache=False)
    call = calls.compiled_call(engine.pipeline.unet)
    assert call is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", calls.RecompileWarning)
        first = generate(engine)
        # int64 timesteps (PNDM) and float ones (Euler, DPM-Solver) share one graph.
        generate(engine, scheduler="euler")
        generate(engine, scheduler="dpm++-2m", seed=4, prompt_weighting=None)
    assert first == generate(plain), "the eager backend does the uncompiled work"
    with pytest.warns(
        calls.RecompileWarning,
        match=r"unet compiled again: argument 0 \[2, 4, 32, 32\] float32 -> \[2, 4, 24, 32\]",
    ):
        generate(engine, height=48)
    with pytest.warns(calls.RecompileWarning, match=r"argument 0 \[2, 4, 32, 32\] float32 -> \[1, 4, 32, 32\]"):
        generate(engine, guidance_scale=1.0)
    stats = calls.compile_stats(engine.pipeline)
    assert stats["unet"]["compiles"] == 3 and stats["unet"]["input_kinds"] == 3


def test_the_recompile_limit_is_never_passed_silently(eager_dynamo: None) -> None:
    import torch

    engine = load("tiny:sd15", device="cpu", accelerators=["fp32", "compile"], cache=False)
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for height in (64, 56, 48):
            generate(engine, height=height, num_inference_steps=1)
    messages = [str(w.message) for w in caught if issubclass(w.category, calls.RecompileWarning)]
    assert any("past torch's recompile limit (2" in message for message in messages), messages


@pytest.mark.parametrize(
    ("family", "device", "cuda_graphs"),
    [("sd15", "cuda", True), ("sdxl", "cuda", False), ("kandinsky22", "cuda", False), ("sd15", "cpu", False)],
)
def test_regional_cuda_graphs_are_a_capability_the_provider_declares(
    family: str, device: str, cuda_graphs: bool
) -> None:
    from t2i_core import ModelProvider, get_registry

    provider = get_registry().provider(family)
    assert type(provider).cuda_graph_regions is (family == "sd15"), "declared by the family's own plugin"
    assert accelerators.regional_cuda_graphs(provider, device) is cuda_graphs

    class ThirdParty(ModelProvider):
        name = "third-party"

    assert accelerators.regional_cuda_graphs(ThirdParty(), "cuda") is False, "off unless declared"


def test_regional_cuda_graphs_mark_a_step_per_denoiser_call(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from t2i_core import get_registry

    engine = load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)
    options: list[dict[str, Any]] = []
    monkeypatch.setattr(type(engine.pipeline.unet), "compile_repeated_blocks", lambda self, **kw: options.append(kw))
    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    context = LoadContext(
        model=engine.model,
        source=engine.source,
        family="sd15",
        provider=engine.provider,
        device="cuda",
        accelerators=("fp16", "compile-regional"),
    )
    get_registry().accelerator("compile-regional").compile(engine.pipeline, context)
    assert options == [{"fullgraph": True, "options": {**INDUCTOR_TUNING, "triton.cudagraphs": True}}]
    generate(engine, num_inference_steps=2, scheduler="ddim")
    assert len(marks) == 2  # one per UNet call (guidance batches both halves in one call)


def test_compiling_on_cuda_tunes_inductor_for_the_compiled_module_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' speed-guide settings travel in torch.compile's ``options``; inductor's config stays."""
    import torch
    import torch._inductor.config as inductor_config

    from t2i_core import get_registry

    monkeypatch.delenv("T2I_COMPILE_CACHE", raising=False)
    monkeypatch.delenv("T2I_COMPILE_ARTIFACTS", raising=False)
    before = inductor_config.get_config_copy()
    engine = load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(calls, "compile_function", lambda function, options: seen.append(options) or function)
    context = LoadContext(
        model=engine.model,
        source=engine.source,
        family="sd15",
        provider=engine.provider,
        device="cuda",
        accelerators=("fp16", "compile"),
    )
    get_registry().accelerator("compile").apply(engine.pipeline, context)
    tuned = {**INDUCTOR_TUNING, "triton.cudagraphs": True}
    assert seen == [{"fullgraph": False, "dynamic": False, "options": tuned}]
    assert inductor_config.get_config_copy() == before
    torch.compile(lambda x: x, **seen[0])  # torch accepts every option (it checks them here)
    assert seen[0]["options"] == tuned, "the options given to torch.compile are left as they were"


def test_loading_and_running_a_compiled_engine_changes_no_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real inductor on CPU: inductor's and AOTAutograd's config and the environment are as before."""
    import os

    import torch
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("T2I_COMPILE_CACHE", raising=False)
    monkeypatch.delenv("T2I_COMPILE_ARTIFACTS", raising=False)

    def environment() -> dict[str, str]:
        # Inductor's own bookkeeping: the folder it compiles into (its default unless the user chose
        # one) and private variables of its C++ wrapper.
        variables = {k: v for k, v in os.environ.items() if not k.startswith("_TORCHINDUCTOR_")}
        variables.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(default_cache_dir()))
        return variables

    torch._dynamo.reset()
    before = environment()
    configs = inductor_config.get_config_copy(), functorch_config.get_config_copy()
    engine = load("tiny:sd15", device="cpu", accelerators=["fp32", "compile-vae"], cache=False)
    generate(engine, num_inference_steps=1, height=32, width=32)
    assert calls.compile_stats(engine.pipeline)["vae.decoder"]["compiles"] == 1, "inductor compiled the decoder"
    torch._dynamo.reset()
    assert (inductor_config.get_config_copy(), functorch_config.get_config_copy()) == configs
    assert environment() == before


def test_regional_compile_takes_whole_joint_blocks_of_an_sd3_transformer() -> None:
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    )
    assert accelerators.compile_regions(transformer) == 2
    compiled = {type(m).__name__ for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == {"JointTransformerBlock"}


def test_a_recompile_with_the_same_input_kinds_is_warned_too(eager_dynamo: None) -> None:
    """A guard on a value (here a Python constant the forward reads) recompiles with unchanged shapes."""
    import torch

    class Scaled(torch.nn.Module):
        factor = 2

        def forward(self, sample: Any, timestep: Any) -> Any:
            return sample * self.factor + timestep

    module = Scaled()
    call = calls.install_compiled(module, "toy", {"dynamic": False}, normalise_timestep=True)
    sample = torch.ones(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", calls.RecompileWarning)
        module(sample, torch.tensor(1))
        module(sample, torch.tensor(2.0))  # another timestep dtype: the same graph
    Scaled.factor = 3
    with pytest.warns(calls.RecompileWarning, match="toy compiled again: the same input kinds"):
        module(sample, torch.tensor(1))
    assert call.compiles == 2 and len(call.signatures) == 1
