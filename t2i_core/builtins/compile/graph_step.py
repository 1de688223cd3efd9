"""``graph-step``: the whole guided denoising step captured in one CUDA graph.

A denoising step is many small launches besides the UNet: the guidance batch is concatenated,
the input scaled, the UNet run, the two halves combined, and the scheduler's update applied.
``graph-step`` runs that step as one function over static buffers (latents, text embeddings,
timestep, sigmas), records it once per shape in a ``torch.cuda.CUDAGraph`` and replays it every
step, copying the step's timestep and sigmas into their buffers first. On a CPU there is no
graph: the same function runs eagerly each step, which is how the tests prove that the
restructured step gives diffusers' own images, bit for bit.

What it covers: Stable Diffusion 1.x pipelines (``StableDiffusionPipeline``) with the Euler
scheduler (``scheduler="euler"``; epsilon prediction, no churn) and text prompts, negative
prompts or Compel embeddings. Every other call (another scheduler, ControlNet, a family it does
not know) runs diffusers' own loop unchanged, with a warning on the ``t2i.accelerators`` logger
the first time.
"""

from __future__ import annotations

import logging
from typing import Any

from t2i_core import Accelerator, LoadContext

from .._components import nothing_to_do

logger = logging.getLogger("t2i.accelerators")

#: the call arguments the captured loop handles (what the SD 1.5 provider and Compel pass)
HANDLED = frozenset(
    {
        "prompt",
        "negative_prompt",
        "prompt_embeds",
        "negative_prompt_embeds",
        "height",
        "width",
        "num_inference_steps",
        "guidance_scale",
        "num_images_per_prompt",
        "generator",
        "callback_on_step_end",
    }
)


class GraphStep(Accelerator):
    name = "graph-step"
    phase = "compile"
    devices = ("cuda", "cpu")
    # Offloading moves weights between replays; a compiled UNet with CUDA graphs of its own cannot
    # be captured inside another graph.
    conflicts = ("cpu_offload", "sequential_offload", "group_offload", "compile", "compile-regional")
    description = (
        "captures the whole guided denoising step (UNet, guidance, Euler update) in one CUDA graph; "
        "SD 1.x with scheduler='euler'"
    )

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        from diffusers import StableDiffusionPipeline

        if type(pipeline) is not StableDiffusionPipeline:
            nothing_to_do(self.name, pipeline, "the captured Euler step (StableDiffusionPipeline only)")
            return
        pipeline.__class__ = _captured_class(type(pipeline))
        pipeline._graph_steps = {}
        pipeline._graph_step_warned = set()


_classes: dict[type, type] = {}


def _captured_class(base: type) -> type:
    if base not in _classes:
        _classes[base] = type(f"GraphStep{base.__name__}", (_GraphStepCall, base), {})
    return _classes[base]


class _GraphStepCall:
    """Mixed in before the pipeline's class: `__call__` takes the captured loop when it can."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reason = _unsupported(self, args, kwargs)
        if reason is None:
            return run_captured(self, **kwargs)
        warned = self.__dict__.setdefault("_graph_step_warned", set())
        if reason not in warned:
            warned.add(reason)
            logger.warning("accelerator 'graph-step' ran diffusers' own loop: %s", reason)
        return super().__call__(*args, **kwargs)  # type: ignore[misc]


def _unsupported(pipeline: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    from diffusers import EulerDiscreteScheduler

    scheduler = pipeline.scheduler
    if args:
        return "positional arguments"
    extra = sorted(set(kwargs) - HANDLED)
    if extra:
        return f"arguments it does not capture: {', '.join(extra)}"
    if type(scheduler) is not EulerDiscreteScheduler:
        return f"the {type(scheduler).__name__} (use scheduler='euler')"
    config = scheduler.config
    if config.prediction_type != "epsilon":
        return f"prediction_type={config.prediction_type!r}"
    if pipeline.unet.config.time_cond_proj_dim is not None:
        return "a UNet with guidance embedding (LCM)"
    if not isinstance(kwargs.get("prompt", ""), (str, type(None))):
        return "a list of prompts"
    return None


def run_captured(
    pipeline: Any,
    *,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    prompt_embeds: Any = None,
    negative_prompt_embeds: Any = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    num_images_per_prompt: int = 1,
    generator: Any = None,
    callback_on_step_end: Any = None,
) -> Any:
    """diffusers' ``StableDiffusionPipeline.__call__`` for the supported arguments, step by step
    through `_StepGraph`. Every operation outside the step is the pipeline's own method, called
    with what the pipeline would pass."""
    import torch

    with torch.no_grad():  # as diffusers' __call__
        return _run_captured(
            pipeline,
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            generator,
            callback_on_step_end,
        )


def _run_captured(
    pipeline: Any,
    prompt: str | None,
    negative_prompt: str | None,
    prompt_embeds: Any,
    negative_prompt_embeds: Any,
    height: int | None,
    width: int | None,
    num_inference_steps: int,
    guidance_scale: float,
    num_images_per_prompt: int,
    generator: Any,
    callback_on_step_end: Any,
) -> Any:
    import torch
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    if not height or not width:
        size = pipeline.unet.config.sample_size
        height = width = size * pipeline.vae_scale_factor
    pipeline.check_inputs(
        prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds, None, None, None
    )
    pipeline._guidance_scale = guidance_scale
    pipeline._guidance_rescale = 0.0
    pipeline._clip_skip = None
    pipeline._cross_attention_kwargs = None
    pipeline._interrupt = False
    batch_size = 1 if prompt is not None else prompt_embeds.shape[0]
    device = pipeline._execution_device
    guided = pipeline.do_classifier_free_guidance
    prompt_embeds, negative_prompt_embeds = pipeline.encode_prompt(
        prompt,
        device,
        num_images_per_prompt,
        guided,
        negative_prompt,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        lora_scale=None,
        clip_skip=None,
    )
    if guided:
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
    scheduler = pipeline.scheduler
    timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device)
    latents = pipeline.prepare_latents(
        batch_size * num_images_per_prompt,
        pipeline.unet.config.in_channels,
        height,
        width,
        prompt_embeds.dtype,
        device,
        generator,
        None,
    )
    pipeline._num_timesteps = len(timesteps)
    step = _step_graph(pipeline, latents, prompt_embeds, guidance_scale if guided else None)
    step.start(latents, prompt_embeds)
    sigmas = scheduler.sigmas
    for index, timestep in enumerate(timesteps):
        step.run(timestep, sigmas[index], sigmas[index + 1])
        if callback_on_step_end is not None:
            outputs = callback_on_step_end(pipeline, index, timestep, {"latents": step.latents})
            if outputs.get("latents") is not None and outputs["latents"] is not step.latents:
                step.latents.copy_(outputs["latents"])
    latents = step.latents.clone()
    image = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
    image, has_nsfw_concept = pipeline.run_safety_checker(image, device, prompt_embeds.dtype)
    denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not nsfw for nsfw in has_nsfw_concept]
    image = pipeline.image_processor.postprocess(image, output_type="pil", do_denormalize=denormalize)
    pipeline.maybe_free_model_hooks()
    return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)


def _step_graph(pipeline: Any, latents: Any, prompt_embeds: Any, guidance_scale: float | None) -> _StepGraph:
    """The pipeline's `_StepGraph` for these shapes, dtypes and guidance (recorded once each on CUDA)."""
    key = (tuple(latents.shape), latents.dtype, tuple(prompt_embeds.shape), guidance_scale, str(latents.device))
    graphs = pipeline.__dict__.setdefault("_graph_steps", {})
    if key not in graphs:
        graphs[key] = _StepGraph(pipeline.unet, latents, prompt_embeds, guidance_scale)
    step: _StepGraph = graphs[key]
    return step


class _StepGraph:
    """One guided Euler step over static buffers; a CUDA graph of it on CUDA."""

    def __init__(self, unet: Any, latents: Any, prompt_embeds: Any, guidance_scale: float | None) -> None:
        import torch

        self.unet = unet
        self.guidance_scale = guidance_scale
        self.latents = torch.empty_like(latents)
        self.prompt_embeds = torch.empty_like(prompt_embeds)
        # diffusers keeps Euler's sigmas on the CPU; on CUDA the buffers live on the device.
        self.timestep = torch.zeros((), dtype=torch.float32, device=latents.device)
        self.sigma = torch.zeros((), dtype=torch.float32, device=latents.device)
        self.sigma_next = torch.zeros((), dtype=torch.float32, device=latents.device)
        self.graph: Any = None
        self.cuda = latents.device.type == "cuda"

    def start(self, latents: Any, prompt_embeds: Any) -> None:
        self.latents.copy_(latents)
        self.prompt_embeds.copy_(prompt_embeds)

    def run(self, timestep: Any, sigma: Any, sigma_next: Any) -> None:
        self.timestep.copy_(timestep)
        self.sigma.copy_(sigma)
        self.sigma_next.copy_(sigma_next)
        if not self.cuda:
            self.latents.copy_(self.step())
            return
        if self.graph is None:
            self.graph = self._record()
        self.graph.replay()

    def step(self) -> Any:
        """diffusers' loop body and ``EulerDiscreteScheduler.step`` (epsilon, no churn), operation for operation."""
        import torch

        latents = self.latents
        guided = self.guidance_scale is not None
        latent_model_input = torch.cat([latents] * 2) if guided else latents
        latent_model_input = latent_model_input / ((self.sigma**2 + 1) ** 0.5)
        noise_pred = self.unet(
            latent_model_input,
            self.timestep,
            encoder_hidden_states=self.prompt_embeds,
            timestep_cond=None,
            cross_attention_kwargs=None,
            added_cond_kwargs=None,
            return_dict=False,
        )[0]
        if guided:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
        sample = latents.to(torch.float32)
        sigma_hat = self.sigma * (0.0 + 1)
        pred_original_sample = sample - sigma_hat * noise_pred
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigma_next - sigma_hat
        prev_sample = sample + derivative * dt
        return prev_sample.to(noise_pred.dtype)

    def _record(self) -> Any:
        """Warm up on a side stream (on copies of the buffers' contents), then capture one step."""
        import torch

        saved = self.latents.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.latents.copy_(self.step())
        self.latents.copy_(saved)
        return graph


ACCELERATORS: tuple[Accelerator, ...] = (GraphStep(),)
