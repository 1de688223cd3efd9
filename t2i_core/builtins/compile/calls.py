"""`CompiledCall`: a compiled ``forward`` made safe to call from a diffusers pipeline.

A compiled denoiser or decoder runs through `CompiledCall`, outside the compiled region, which
makes three promises on every device:

- **CUDA-graph outputs are safe to keep.** With CUDA graphs (inductor's ``triton.cudagraphs``,
  what ``mode="reduce-overhead"`` turns on) the next replay of a graph overwrites its last
  output, and schedulers keep model outputs across steps (PNDM's ``ets``, the multistep solvers'
  ``model_outputs``). `CompiledCall` marks each call as a new step
  (``torch.compiler.cudagraph_mark_step_begin``) and hands back a clone of the output.
- **The timestep's dtype never recompiles.** Schedulers give int64 (PNDM, DDIM) or float
  (Euler, DPM-Solver) timesteps; the call casts them to float32 first, which the models' own
  timestep embeddings do anyway, so the numbers are the same.
- **Recompiles are visible.** A call that compiled again warns with `RecompileWarning` naming
  the input that changed (a new size, batch, guidance on/off, embeddings of a new length, a
  ControlNet's extra inputs); `compile_stats()` counts them; reaching torch's recompile limit,
  after which new inputs would run eagerly, is a warning too, never silent.
"""

from __future__ import annotations

import warnings
from typing import Any

from .._components import autoencoders, denoisers


class RecompileWarning(UserWarning):
    """A compiled model compiled again for a new kind of input (50-250 s on a large GPU)."""


def uses_cuda_graphs(options: dict[str, Any]) -> bool:
    """Whether ``torch.compile(**options)`` captures CUDA graphs (by its mode or inductor options)."""
    inductor = options.get("options") or {}
    return options.get("mode") == "reduce-overhead" or bool(inductor.get("triton.cudagraphs", False))


class CompiledCall:
    """Stands in for a module's ``forward``: the compiled forward, made safe (see the module docstring).

    `normalise_timestep` casts the second positional argument or ``timestep=`` to float32
    (denoisers only). The counters feed `compile_stats`.
    """

    def __init__(self, module: Any, name: str, options: dict[str, Any], *, normalise_timestep: bool) -> None:
        self.name = name
        self.options = dict(options)
        self.cuda_graphs = uses_cuda_graphs(options)
        self.normalise_timestep = normalise_timestep
        self.compiled = compile_function(module.forward, options)
        self.signatures: list[tuple[Any, ...]] = []
        self.compiles = 0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        if self.normalise_timestep:
            args, kwargs = _float_timestep(args, kwargs)
        signature = _signature(args, kwargs)
        graphs_before = _compiled_graphs()
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        output = self.compiled(*args, **kwargs)
        self.calls += 1
        if _compiled_graphs() > graphs_before:
            self.compiles += 1
            if self.compiles > 1:
                # A new kind of input, or a guard on a value that changed with the same shapes
                # (swapped weights, a Python constant): either way, name the nearest input seen.
                nearest = min(self.signatures or [signature], key=lambda seen: len(_changes(seen, signature)))
                warnings.warn(
                    RecompileWarning(f"{self.name} compiled again: {_difference(nearest, signature)}"), stacklevel=2
                )
        if signature not in self.signatures:
            self.signatures.append(signature)
            limit = int(torch._dynamo.config.recompile_limit)
            if len(self.signatures) == limit + 1:
                warnings.warn(
                    RecompileWarning(
                        f"{self.name} has met {len(self.signatures)} kinds of input, past torch's recompile limit "
                        f"({limit}, torch._dynamo.config.recompile_limit): further new inputs run eagerly"
                    ),
                    stacklevel=2,
                )
        return _clone(output) if self.cuda_graphs else output


def compile_function(function: Any, options: dict[str, Any]) -> Any:
    """``torch.compile(function, **options)``: one place for tests and benchmarks to change the backend."""
    import torch

    # torch.compile pops keys of its ``options`` dict: hand it a copy, so `options` stays as given.
    inductor = options.get("options")
    return torch.compile(function, **{**options, **({"options": dict(inductor)} if inductor else {})})


def install_compiled(
    module: Any, name: str, options: dict[str, Any], *, normalise_timestep: bool = False
) -> CompiledCall:
    """Compile `module`'s forward in place, through a `CompiledCall`."""
    call = CompiledCall(module, name, options, normalise_timestep=normalise_timestep)
    module.forward = call
    return call


def compiled_call(module: Any) -> CompiledCall | None:
    """The `CompiledCall` installed on `module`, if any."""
    call = module.__dict__.get("forward")
    return call if isinstance(call, CompiledCall) else None


def compile_stats(pipeline: Any) -> dict[str, dict[str, int]]:
    """Per compiled component: calls, compiles and distinct input kinds seen (for benchmarks and logs)."""
    stats = {}
    for component, module in _compiled_modules(pipeline):
        call = compiled_call(module)
        if call is not None:
            stats[component] = {"calls": call.calls, "compiles": call.compiles, "input_kinds": len(call.signatures)}
    return stats


def _compiled_modules(pipeline: Any) -> list[tuple[str, Any]]:
    found = [(name, module) for name, module in denoisers(pipeline).items()]
    found += [(f"{name}.decoder", module.decoder) for name, module in autoencoders(pipeline).items()]
    return found


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _float_timestep(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    import torch

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dtype != torch.float32:
            return value.to(torch.float32)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.tensor(float(value), dtype=torch.float32)
        return value

    if "timestep" in kwargs:
        kwargs = {**kwargs, "timestep": cast(kwargs["timestep"])}
    elif len(args) >= 2:
        args = (args[0], cast(args[1]), *args[2:])
    return args, kwargs


def _describe(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype).removeprefix("torch."))
    if isinstance(value, (list, tuple)):
        return tuple(_describe(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _describe(item)) for key, item in value.items()))
    if value is None or isinstance(value, (bool, str)):
        return value
    return type(value).__name__


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    return (
        tuple((f"argument {index}", _describe(a)) for index, a in enumerate(args)),
        tuple(sorted((k, _describe(v)) for k, v in kwargs.items())),
    )


def _changes(old: tuple[Any, ...], new: tuple[Any, ...]) -> list[str]:
    before = dict(old[0] + old[1])
    after = dict(new[0] + new[1])
    return [
        f"{key} {_render(before.get(key, 'absent'))} -> {_render(after.get(key, 'absent'))}"
        for key in sorted(set(before) | set(after), key=str)
        if before.get(key, "absent") != after.get(key, "absent")
    ]


def _difference(old: tuple[Any, ...], new: tuple[Any, ...]) -> str:
    """What changed from `old` to `new`, the input kinds of two calls, in words."""
    return "; ".join(_changes(old, new)) or "the same input kinds (a guard on a value changed)"


def _render(description: Any) -> str:
    if isinstance(description, tuple) and len(description) == 3 and description[0] == "tensor":
        return f"{list(description[1])} {description[2]}"
    return str(description)


def _clone(output: Any) -> Any:
    """A copy of `output` (tensors, tuples, lists, diffusers' output dataclasses) that no CUDA graph owns."""
    import torch

    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        return tuple(_clone(item) for item in output)
    if isinstance(output, list):
        return [_clone(item) for item in output]
    if isinstance(output, dict):  # diffusers' BaseOutput is an OrderedDict dataclass
        return type(output)(**{key: _clone(value) for key, value in output.items()})
    return output
