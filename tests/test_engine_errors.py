"""Errors by type: out-of-memory is recognised by torch's types, and by text only where torch has no type."""

from __future__ import annotations

from typing import Any

import pytest

from t2i_core import GenerationError, GenerationRequest, load
from t2i_core.engine.run import is_out_of_memory


def test_torch_cpu_allocator_text_is_pinned() -> None:
    """torch raises a plain RuntimeError when the CPU allocator fails: its text is what t2i matches."""
    import torch

    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**62, dtype=torch.uint8)
    assert type(caught.value) is RuntimeError
    assert "DefaultCPUAllocator: can't allocate memory" in str(caught.value)
    assert is_out_of_memory(caught.value)


def test_out_of_memory_types() -> None:
    import torch

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    # a RuntimeError that merely mentions allocating is not an out-of-memory error
    assert not is_out_of_memory(RuntimeError("could not allocate a tensor of the expected shape"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_generate_turns_out_of_memory_into_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    engine = load("tiny:sd15")

    def exhausted(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(engine.provider), "run", exhausted)
    with pytest.raises(GenerationError, match=r"out of memory on cpu making 1 image\(s\) of 64x64.*low-memory"):
        engine.generate(GenerationRequest(prompt="a cat", seed=1))


def test_other_runtime_errors_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = load("tiny:sd15")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("expected scalar type Float but found Half; cannot allocate")

    monkeypatch.setattr(type(engine.provider), "run", broken)
    with pytest.raises(RuntimeError, match="expected scalar type"):
        engine.generate(GenerationRequest(prompt="a cat", seed=1))
