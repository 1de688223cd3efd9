"""t2i-lora: LoRA adapters and textual-inversion embeddings equal raw diffusers, bit for bit.

The reference of every parity test is what a diffusers user writes: ``load_lora_weights(file,
adapter_name=n)`` for each LoRA, ``set_adapters(names, adapter_weights=scales)``, then the same
call; ``load_textual_inversion`` for each embedding (for SDXL, ``clip_l`` into the first encoder
and ``clip_g`` into the second, as diffusers documents). The LoRA and embedding files are built
offline by `t2i_lora.tiny`, with random non-zero weights, so that each changes the image.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support import tiny_folder

from t2i_core import (
    Embedding,
    GenerationRequest,
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    Lora,
    UnsupportedFeatureError,
    clear_cache,
    load,
)
from t2i_core.cli import main
from t2i_core.kit import Turns
from t2i_core.testing import (
    as_array,
    assert_images_close,
    assert_images_equal,
    cpu_generators,
    raw_pipeline,
    refuse_to_run,
)

pytest.importorskip("t2i_lora")
from t2i_lora import tiny

STEPS = 2
PROMPT = "a lighthouse on a cliff"
# The raw-diffusers references load several adapters into one model, which peft warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")


@pytest.fixture(scope="module", autouse=True)
def own_weights() -> Iterator[None]:
    """This module's engines get weights of their own, and leave none with adapters to other tests."""
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRAs and embeddings for the tiny SD 1.5 and SDXL checkpoints, in the layouts users download."""
    root = tmp_path_factory.mktemp("lora")
    made: dict[str, Path] = {}
    for family in ("sd15", "sdxl"):
        folder = tiny_folder(family)
        made[f"{family}-unet"] = tiny.lora_file(folder, root / family / "unet.safetensors", seed=1)
        made[f"{family}-both"] = tiny.lora_file(folder, root / family / "both.safetensors", seed=2, text_encoders=True)
        made[f"{family}-kohya"] = tiny.lora_file(
            folder, root / family / "kohya.safetensors", seed=3, text_encoders=True, layout="kohya", rank=2
        )
        made[f"{family}-peft-prefixed"] = tiny.lora_file(
            folder,
            root / family / "peft.safetensors",
            seed=4,
            text_encoders=True,
            layout="peft",
            text_model_prefix=True,
            alpha=2,
        )
        made[f"{family}-text"] = tiny.lora_file(
            folder, root / family / "text.safetensors", seed=5, unet=False, text_encoders=True, rank=8
        )
        made[f"{family}-neg"] = tiny.embedding_file(folder, root / family / "neg.safetensors", token="<neg>", seed=6)
        made[f"{family}-style"] = tiny.embedding_file(
            folder, root / family / "style.safetensors", token="<style>", vectors=3, seed=7
        )
    return made


def raw_images(
    family: str,
    loras: tuple[tuple[Path, float], ...] = (),
    embeddings: tuple[tuple[Path, str], ...] = (),
    *,
    seed: int = 3,
    **call: Any,
) -> list[Any]:
    """Raw diffusers: each LoRA loaded under a name, set_adapters with the scales, each embedding loaded."""
    pipeline = raw_pipeline(tiny_folder(family))
    for index, (path, _) in enumerate(loras):
        pipeline.load_lora_weights(str(path), adapter_name=f"raw{index}")
    if loras:
        pipeline.set_adapters([f"raw{i}" for i in range(len(loras))], adapter_weights=[s for _, s in loras])
    for path, token in embeddings:
        load_embedding(pipeline, family, path, token)
    call.setdefault("prompt", PROMPT)
    return list(pipeline(num_inference_steps=STEPS, generator=cpu_generators(seed, 1), **call).images)


@functools.cache
def _base_images(family: str, call: tuple[tuple[str, str], ...]) -> tuple[Any, ...]:
    return tuple(raw_images(family, **dict(call)))


def base_images(family: str, **call: str) -> list[Any]:
    """Raw diffusers without LoRAs or embeddings (made once per family and arguments)."""
    return list(_base_images(family, tuple(sorted(call.items()))))


def load_embedding(pipeline: Any, family: str, path: Path, token: str) -> None:
    if family == "sdxl":  # diffusers' documented recipe for SDXL embeddings
        from safetensors.torch import load_file

        state = load_file(str(path))
        pipeline.load_textual_inversion(
            state["clip_g"], token=token, text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2
        )
        pipeline.load_textual_inversion(
            state["clip_l"], token=token, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer
        )
    else:
        pipeline.load_textual_inversion(str(path), token=token)


def request(**fields: Any) -> GenerationRequest:
    fields.setdefault("prompt", PROMPT)
    fields.setdefault("num_inference_steps", STEPS)
    fields.setdefault("seed", 3)
    return GenerationRequest(**fields)


def loras_of(*pairs: tuple[Path, float]) -> tuple[Lora, ...]:
    return tuple(Lora(str(path), scale) for path, scale in pairs)


@pytest.fixture(scope="module")
def engines() -> dict[str, Any]:
    return {family: load(f"tiny:{family}", device="cpu") for family in ("sd15", "sdxl")}


# -- the request ------------------------------------------------------------------------------


def test_lora_and_embedding_values_are_checked() -> None:
    assert Lora("style.safetensors", 0.8) == Lora(source="style.safetensors", scale=0.8, weight_name=None)
    assert Embedding(Path("neg.safetensors"), token="<neg>").source == "neg.safetensors"
    assert GenerationRequest(prompt="a").loras == () and GenerationRequest(prompt="a").embeddings == ()
    assert GenerationRequest(prompt="a", loras=[Lora("x")]).loras == (Lora("x"),)
    for bad in ({"source": ""}, {"source": 3}, {"source": "x", "scale": "1"}, {"source": "x", "scale": float("inf")}):
        with pytest.raises(InvalidRequestError):
            Lora(**bad)
    with pytest.raises(InvalidRequestError, match="scale=11.0"):
        Lora("x", 11)
    with pytest.raises(InvalidRequestError, match="token"):
        Embedding("x", token=" <neg>")
    with pytest.raises(InvalidRequestError, match="a tuple of t2i_core.Lora"):
        GenerationRequest(prompt="a", loras=("style.safetensors",))


def test_metadata_names_files_by_name_and_hash_not_path(engines: dict[str, Any], files: dict[str, Path]) -> None:
    import hashlib

    lora, embedding = files["sd15-both"], files["sd15-neg"]
    result = engines["sd15"].generate(
        request(prompt="a <neg>", loras=(Lora(str(lora), 0.5),), embeddings=(Embedding(str(embedding), "<neg>"),))
    )
    data = result.metadata()
    assert json.loads(data["loras"]) == [
        {"name": "both.safetensors", "sha256": hashlib.sha256(lora.read_bytes()).hexdigest(), "scale": 0.5}
    ]
    assert json.loads(data["embeddings"]) == [
        {"name": "neg.safetensors", "sha256": hashlib.sha256(embedding.read_bytes()).hexdigest(), "token": "<neg>"}
    ]
    assert str(lora.parent) not in json.dumps(data)
    plain = engines["sd15"].generate(request()).metadata()
    assert "loras" not in plain and "embeddings" not in plain


# -- exactness --------------------------------------------------------------------------------

CASES = {
    "unet": (("unet", 1.0),),
    "unet+text-encoders": (("both", 0.7),),
    "kohya": (("kohya", 1.0),),
    "peft-text_model-prefix": (("peft-prefixed", 0.6),),
    "text-encoders-only": (("text", 1.0),),
    "several": (("unet", 0.5), ("both", -0.4), ("kohya", 1.2)),
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("case", list(CASES))
def test_loras_match_raw_diffusers(engines: dict[str, Any], files: dict[str, Path], family: str, case: str) -> None:
    pairs = tuple((files[f"{family}-{name}"], scale) for name, scale in CASES[case])
    result = engines[family].generate(request(loras=loras_of(*pairs), negative_prompt="blurry"))
    expected = raw_images(family, pairs, negative_prompt="blurry")
    assert_images_equal(result.images, expected)
    # ... and every LoRA changes the image: the comparison above can fail.
    base = base_images(family, negative_prompt="blurry")
    assert not np.array_equal(as_array(result.images[0]), as_array(base[0]))


def test_every_text_encoder_gets_its_adapter(engines: dict[str, Any], files: dict[str, Path]) -> None:
    engine = engines["sdxl"]
    for name in ("both", "kohya", "peft-prefixed", "text"):
        engine.generate(request(loras=(Lora(str(files[f"sdxl-{name}"])),)))
    adapters = engine.pipeline.get_list_adapters()
    assert set(adapters) == {"unet", "text_encoder", "text_encoder_2"}
    # four files with text-encoder layers, each in both encoders (the kohya and prefixed layouts too)
    assert len(adapters["text_encoder"]) == len(adapters["text_encoder_2"]) == 4


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_no_lora_is_the_base_image_after_loras(engines: dict[str, Any], files: dict[str, Path], family: str) -> None:
    engine = engines[family]
    engine.generate(request(loras=(Lora(str(files[f"{family}-both"]), 0.9),)))
    assert_images_equal(
        engine.generate(request(negative_prompt="blurry")).images, base_images(family, negative_prompt="blurry")
    )


def test_switching_loras_loads_each_file_once_per_weights(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    from diffusers import StableDiffusionPipeline

    loaded: list[str] = []
    original = StableDiffusionPipeline.load_lora_weights

    def counting(self: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
        loaded.append(str(source))
        return original(self, source, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "load_lora_weights", counting)
    clear_cache()  # weights of their own, which no other test put adapters into
    first = load("tiny:sd15", device="cpu", accelerators=["fp32"])
    second = load("tiny:sd15", device="cpu", accelerators=["fp32"])  # the same cached weights
    a, b = files["sd15-unet"], files["sd15-both"]
    for engine, pairs in ((first, ((a, 1.0),)), (second, ((b, 0.5),)), (first, ((a, 0.3), (b, 1.0))), (second, ())):
        engine.generate(request(loras=loras_of(*pairs)))
    assert sorted(loaded) == sorted([str(a), str(b)])


# -- embeddings -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_embeddings_match_raw_diffusers_in_prompt_and_negative(
    engines: dict[str, Any], files: dict[str, Path], family: str
) -> None:
    neg, style = files[f"{family}-neg"], files[f"{family}-style"]
    embeddings = ((neg, "<neg>"), (style, "<style>"))  # <style> has three vectors
    fields = {"prompt": "a <style> lighthouse", "negative_prompt": "<neg>, blurry"}
    result = engines[family].generate(
        request(embeddings=tuple(Embedding(str(path), token) for path, token in embeddings), **fields)
    )
    assert_images_equal(result.images, raw_images(family, embeddings=embeddings, **fields))
    assert not np.array_equal(as_array(result.images[0]), as_array(raw_images(family, **fields)[0]))


def test_two_cached_engines_keep_token_ids_in_step(files: dict[str, Path]) -> None:
    """Each engine has its own tokenizer; the shared text encoder has one row per token, for all."""
    first = load("tiny:sd15", device="cpu", accelerators=["fp32", "sdpa"])
    second = load("tiny:sd15", device="cpu", accelerators=["fp32", "sdpa"])
    neg, style = Embedding(str(files["sd15-neg"]), "<neg>"), Embedding(str(files["sd15-style"]), "<style>")
    first.generate(request(prompt="a <neg>", embeddings=(neg,)))  # <neg> gets the first new row
    # In raw diffusers, loading into the second engine's own tokenizer would write <style> over <neg>'s row.
    both = second.generate(request(prompt="a <style> and <neg>", embeddings=(style, neg)))
    again = first.generate(request(prompt="a <neg> and <style>", embeddings=(neg, style)))
    for engine in (first, second):
        ids = [engine.pipeline.tokenizer.convert_tokens_to_ids(t) for t in ("<neg>", "<style>", "<style>_2")]
        assert ids == [ids[0], ids[0] + 1, ids[0] + 3]
    reference = ((files["sd15-neg"], "<neg>"), (files["sd15-style"], "<style>"))
    assert_images_equal(both.images, raw_images("sd15", embeddings=reference, prompt="a <style> and <neg>"))
    assert_images_equal(again.images, raw_images("sd15", embeddings=reference, prompt="a <neg> and <style>"))
    # A prompt using a loaded token without listing its embedding would depend on history: refused.
    with pytest.raises(InvalidRequestError, match="'<neg>', the token of the embedding neg.safetensors"):
        second.generate(request(prompt="a <neg>"))
    assert_images_equal(second.generate(request()).images, base_images("sd15"))


def test_embedding_errors(engines: dict[str, Any], files: dict[str, Path]) -> None:
    sd15, sdxl = engines["sd15"], engines["sdxl"]
    with pytest.raises(InvalidRequestError, match=r"embeddings\[0\].source.*clip_l and clip_g"):
        sdxl.resolve(request(embeddings=(Embedding(str(files["sd15-neg"])),)))
    with pytest.raises(InvalidRequestError, match=r"embeddings\[0\].source.*an SDXL embedding"):
        sd15.resolve(request(embeddings=(Embedding(str(files["sdxl-neg"])),)))
    with pytest.raises(InvalidRequestError, match=r"embeddings\[1\].token"):
        sd15.resolve(
            request(embeddings=(Embedding(str(files["sd15-neg"])), Embedding(str(files["sd15-style"]), "<neg>")))
        )
    with pytest.raises(InvalidRequestError, match="not already a word"):
        sd15.resolve(request(embeddings=(Embedding(str(files["sd15-neg"]), "a"),)))


# -- Compel -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_compel_with_loras_and_embeddings(engines: dict[str, Any], files: dict[str, Path], family: str) -> None:
    """Compel's embeddings come from the adapted text encoders, with the textual-inversion manager."""
    pytest.importorskip("t2i_compel")
    from compel import Compel, DiffusersTextualInversionManager, ReturnedEmbeddingsType

    prompt, negative = "a (<style> lighthouse)1.3, cliff--", "(<neg>)1.2"
    pairs = ((files[f"{family}-both"], 0.8),)
    embeddings = ((files[f"{family}-neg"], "<neg>"), (files[f"{family}-style"], "<style>"))
    result = engines[family].generate(
        request(
            prompt=prompt,
            negative_prompt=negative,
            prompt_weighting="compel",
            loras=loras_of(*pairs),
            embeddings=tuple(Embedding(str(path), token) for path, token in embeddings),
        )
    )
    pipeline = raw_pipeline(tiny_folder(family))
    pipeline.load_lora_weights(str(pairs[0][0]), adapter_name="raw0")
    pipeline.set_adapters(["raw0"], adapter_weights=[0.8])
    for path, token in embeddings:
        load_embedding(pipeline, family, path, token)
    manager = DiffusersTextualInversionManager(pipeline)
    kwargs: dict[str, Any] = {}
    if family == "sd15":
        compel = Compel(pipeline.tokenizer, pipeline.text_encoder, textual_inversion_manager=manager)
        positive, negative_embeds = compel.pad_conditioning_tensors_to_same_length([compel(prompt), compel(negative)])
        kwargs = {"prompt_embeds": positive, "negative_prompt_embeds": negative_embeds}
    else:
        import torch

        penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        compels = [
            Compel(tokenizer, encoder, returned_embeddings_type=penultimate, textual_inversion_manager=manager)
            for tokenizer, encoder in (
                (pipeline.tokenizer, pipeline.text_encoder),
                (pipeline.tokenizer_2, pipeline.text_encoder_2),
            )
        ]
        with torch.no_grad():
            pairs_of = [c.pad_conditioning_tensors_to_same_length([c(prompt), c(negative)]) for c in compels]
            pooled = [compels[1].conditioning_provider.get_pooled_embeddings([text]) for text in (prompt, negative)]
        kwargs = {
            "prompt_embeds": torch.cat([p[0] for p in pairs_of], dim=-1),
            "negative_prompt_embeds": torch.cat([p[1] for p in pairs_of], dim=-1),
            "pooled_prompt_embeds": pooled[0],
            "negative_pooled_prompt_embeds": pooled[1],
        }
    expected = pipeline(num_inference_steps=STEPS, generator=cpu_generators(3, 1), **kwargs).images
    assert_images_equal(result.images, expected)


# -- errors before any work -------------------------------------------------------------------


def test_a_lora_for_another_family_is_refused_naming_both(
    monkeypatch: pytest.MonkeyPatch, engines: dict[str, Any], files: dict[str, Path]
) -> None:
    refuse_to_run(monkeypatch, engines["sd15"])
    with pytest.raises(
        InvalidRequestError,
        match=r"a LoRA for this sd15 model \(cross-attention width 32\); unet.safetensors is for cross-attention width 72",
    ):
        engines["sd15"].generate(request(loras=(Lora(str(files["sdxl-unet"])),)))
    with pytest.raises(InvalidRequestError, match="a second text encoder: an SDXL LoRA"):
        engines["sd15"].generate(request(loras=(Lora(str(files["sdxl-text"])),)))


def test_files_diffusers_cannot_load_are_named(tmp_path: Path, engines: dict[str, Any], files: dict[str, Path]) -> None:
    import torch
    from safetensors.torch import save_file

    lycoris = tmp_path / "loha.safetensors"
    save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, str(lycoris))
    engine = engines["sd15"]
    with pytest.raises(
        InvalidRequestError, match=r"keys like 'lora_unet_down_blocks_N_attentions_N_proj_in.hada_wN_a': LyCORIS LoHa"
    ):
        engine.resolve(request(loras=(Lora(str(lycoris)),)))
    pickle = tmp_path / "style.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(InvalidRequestError, match="is a pickle"):
        engine.resolve(request(loras=(Lora(str(pickle)),)))
    with pytest.raises(InvalidRequestError, match=r"loras\[0\].source='missing.safetensors'.*does not exist"):
        engine.resolve(request(loras=(Lora("missing.safetensors"),)))
    (tmp_path / "two").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / "two" / name).write_bytes(files["sd15-unet"].read_bytes())
    with pytest.raises(
        InvalidRequestError, match=r"a weight_name to pick one \(it holds: a.safetensors, b.safetensors\)"
    ):
        engine.resolve(request(loras=(Lora(str(tmp_path / "two")),)))
    picked = engine.generate(request(loras=(Lora(str(tmp_path / "two"), weight_name="b.safetensors"),)))
    assert_images_equal(picked.images, engine.generate(request(loras=(Lora(str(files["sd15-unet"])),))).images)
    with pytest.raises(InvalidRequestError, match=r"loras\[1\].source.*loras\[0\] is the same file"):
        engine.resolve(request(loras=(Lora(str(files["sd15-unet"])), Lora(str(tmp_path / "two" / "a.safetensors")))))


def test_families_without_lora_support_refuse_them(engines: dict[str, Any], files: dict[str, Path]) -> None:
    kandinsky = load("tiny:kandinsky22", device="cpu")
    with pytest.raises(UnsupportedFeatureError, match="LoRA"):
        kandinsky.resolve(request(loras=(Lora(str(files["sd15-unet"])),)))
    fused_projections = load("tiny:sd15", device="cpu", accelerators=["fp32", "fuse_qkv"], cache=False)
    with pytest.raises(IncompatibleAcceleratorsError, match="fuse_qkv"):
        fused_projections.resolve(request(loras=(Lora(str(files["sd15-unet"])),)))


def test_loras_are_refused_on_an_accelerator_that_refuses_them(t2i_registry: Any, files: dict[str, Path]) -> None:
    """An accelerator whose weights take no adapters says so (`Accelerator.refuses`): LoRAs are refused, with its
    reason, and requests without LoRAs are accepted."""
    from t2i_core import Accelerator, hookimpl

    class NoAdapters(Accelerator):
        name, phase, description = "test-no-adapters", "memory", "weights that take no adapters (test)"
        refuses = {"loras": "its weights take no adapters"}

    class Plugin:
        @hookimpl
        def register_accelerators(self, register: Any) -> None:
            register(NoAdapters())

    t2i_registry.register_plugin(Plugin(), "test-no-adapters")
    engine = load("tiny:sd15", device="cpu", accelerators=["fp32", "test-no-adapters"], cache=False)
    with pytest.raises(
        IncompatibleAcceleratorsError,
        match=r"test-no-adapters, loras cannot be used here: its weights take no adapters",
    ):
        engine.resolve(request(loras=(Lora(str(files["sd15-unet"])),)))
    resolved, _ = engine.resolve(request())
    assert resolved.loras == ()


# -- threads ----------------------------------------------------------------------------------


def test_engines_over_the_same_weights_in_threads_get_their_own_loras(files: dict[str, Path]) -> None:
    """Adapters live in the shared UNet: runs with other LoRAs (or none) must wait for their turn."""
    engines = [load("tiny:sd15", device="cpu", accelerators=["fp32"]) for _ in range(3)]
    neg = Embedding(str(files["sd15-neg"]), "<neg>")
    variants = [
        request(seed=1),
        request(seed=2, loras=loras_of((files["sd15-unet"], 1.0))),
        request(seed=3, loras=loras_of((files["sd15-both"], 0.6), (files["sd15-kohya"], 1.0))),
        request(seed=4, loras=loras_of((files["sd15-both"], -0.5)), embeddings=(neg,), negative_prompt="<neg>"),
    ]
    alone = load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)
    expected = [alone.generate(variant).images for variant in variants]
    jobs = [(engines[i % 3], i % len(variants)) for i in range(12)]
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def work(index: int, engine: Any, variant: int) -> None:
        try:
            start.wait()
            results[index] = engine.generate(variants[variant]).images
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, e, v)) for i, (e, v) in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, (_, variant) in enumerate(jobs):
        assert_images_equal(results[index], expected[variant])


def test_turns_let_one_state_run_together_and_make_another_wait() -> None:
    turns = Turns()
    state = {"now": "a", "changes": 0}
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def hold(want: str) -> Any:
        def change() -> None:
            assert turns.running == 0, "the state changed while a run held a turn"
            state["now"], state["changes"] = want, state["changes"] + 1

        return turns.hold(lambda: state["now"] == want, change)

    def run(want: str, label: str, block: bool = False) -> None:
        with hold(want):
            order.append(f"{label}+")
            if block:
                inside.set()
                release.wait(5)
            order.append(f"{label}-")

    first = threading.Thread(target=run, args=("a", "a1", True))
    first.start()
    assert inside.wait(5)
    with hold("a"):  # the same state joins a running turn at once
        assert turns.running == 2
    other = threading.Thread(target=run, args=("b", "b1"))
    other.start()
    late = threading.Thread(target=run, args=("a", "a2"))  # after b in line: waits although a runs
    threading.Timer(0.2, late.start).start()
    threading.Timer(0.5, release.set).start()
    other.join(5)
    late.join(5)
    first.join(5)
    assert order == ["a1+", "a1-", "b1+", "b1-", "a2+", "a2-"]
    assert state["changes"] == 2


# -- fuse_lora ----------------------------------------------------------------------------------

#: Fused weights compute W + s·BA once instead of Wx + s·B(Ax) each step: other rounding, same image
FUSE_LEVELS = 2


def test_fused_loras_are_within_tolerance_and_unfusing_restores_the_base_exactly(files: dict[str, Path]) -> None:
    import torch

    fused = load("tiny:sd15", device="cpu", accelerators=["fp32", "fuse_lora"], cache=False)
    plain = load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)
    original = {name: value.clone() for name, value in fused.pipeline.unet.state_dict().items()}
    one = loras_of((files["sd15-both"], 0.8))
    two = loras_of((files["sd15-unet"], 0.5), (files["sd15-kohya"], 1.0))
    for loras in (one, two, one):
        ours, reference = fused.generate(request(loras=loras)).images, plain.generate(request(loras=loras)).images
        assert_images_close(ours, reference, max_levels=FUSE_LEVELS, why="fused weights round differently")
        assert not np.array_equal(as_array(ours[0]), as_array(base_images("sd15")[0]))
    assert_images_equal(fused.generate(request()).images, base_images("sd15"))
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in fused.pipeline.unet.named_modules():
        if isinstance(layer, BaseTunerLayer):
            assert not layer.merged, name
            assert torch.equal(layer.get_base_layer().weight, original[f"{name}.weight"]), name


def test_unfusing_in_float16_restores_the_weights_bit_for_bit(files: dict[str, Path]) -> None:
    """diffusers' own unfuse subtracts what fusing added: in float16 that drifts (diffusers #5313)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from t2i_lora._adapters import restore_fused, shared_weights

    engine = load("tiny:sd15", device="cpu", accelerators=["fp32", "fuse_lora"], cache=False)
    engine.pipeline.unet.to(torch.float16)
    before = {name: value.clone() for name, value in engine.pipeline.unet.state_dict().items()}
    pipeline = engine.pipeline
    pipeline.load_lora_weights(str(files["sd15-unet"]), adapter_name="a")
    shared = shared_weights(engine)
    from t2i_lora._adapters import _fuse

    drifted = 0
    for _ in range(3):
        pipeline.set_adapters(["a"], adapter_weights=[0.7])
        _fuse(pipeline, shared, ["a"])
        restore_fused(shared)
        # what diffusers' unfuse_lora would have given: fuse again, subtract again
        pipeline.fuse_lora(components=["unet"], adapter_names=["a"])
        pipeline.unfuse_lora(components=["unet"])
        for name, layer in pipeline.unet.named_modules():
            if isinstance(layer, BaseTunerLayer):
                drifted += int(not torch.equal(layer.get_base_layer().weight, before[f"{name}.weight"]))
                layer.get_base_layer().weight.data.copy_(before[f"{name}.weight"])
    assert drifted > 0, "float16 unfusing did not drift here: this test no longer shows why the copy is kept"
    pipeline.set_adapters(["a"], adapter_weights=[0.7])
    _fuse(pipeline, shared, ["a"])
    restore_fused(shared)
    for name, layer in pipeline.unet.named_modules():
        if isinstance(layer, BaseTunerLayer):
            assert torch.equal(layer.get_base_layer().weight, before[f"{name}.weight"]), name


# -- compile: hot-swapped adapters --------------------------------------------------------------


def test_with_compile_switching_loras_never_recompiles(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    """With compile, adapters go into hot-swap slots: other LoRAs and scales change no compiled code.

    torch.compile runs with dynamo's ``eager`` backend here: the same graph capture, guards and
    recompiles as inductor, without its C++ compile time. Graphs are counted by dynamo itself (a
    guard that fails on the UNet's adapters recompiles for inputs of a known shape too). Without
    the slots, each of these requests compiles again.
    """
    import torch
    from torch._dynamo.utils import counters

    from t2i_core.builtins.compile import calls as compilation

    def eager(function: Any, options: dict[str, Any]) -> Any:
        return torch.compile(function, backend="eager", dynamic=False)

    monkeypatch.setattr(compilation, "compile_function", eager)
    torch._dynamo.reset()
    engine = load("tiny:sd15", device="cpu", accelerators=["fp32", "compile"], cache=False)
    plain = load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)
    a, b = files["sd15-unet"], files["sd15-kohya"].parent / "unet2.safetensors"
    tiny.lora_file(tiny_folder("sd15"), b, seed=9, rank=2)
    sequence = [(), ((a, 1.0),), ((b, 0.5),), ((a, -0.7),), ((a, 0.3), (b, 0.2)), ((b, 1.0), (a, 1.0)), ((b, 0.1),), ()]
    graphs: list[int] = []
    for pairs in sequence:
        ours = engine.generate(request(loras=loras_of(*pairs))).images
        graphs.append(int(counters["stats"]["unique_graphs"]))
        expected = plain.generate(request(loras=loras_of(*pairs))).images
        if pairs:
            assert_images_close(ours, expected, max_levels=1, why="hot-swap slots pad the rank with zeros")
        else:
            assert_images_equal(ours, expected)
    # New graphs only when slots appear: the first LoRA (one slot), the first pair (a second slot).
    first = graphs[0]
    assert graphs == [first, first + 1, first + 1, first + 1, first + 2, first + 2, first + 2, first + 2], graphs
    with pytest.raises(IncompatibleAcceleratorsError, match="hot-swaps only the denoiser"):
        engine.resolve(request(loras=(Lora(str(files["sd15-both"])),)))


# -- command line -------------------------------------------------------------------------------


def test_cli_lora_and_embedding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], engines: dict[str, Any], files: dict[str, Path]
) -> None:
    out = tmp_path / "styled.png"
    lora, neg = files["sd15-both"], files["sd15-neg"]
    code = main(
        ["generate", "a <neg> lighthouse", "--model", "tiny:sd15", "--steps", str(STEPS), "--seed", "3",
         "--device", "cpu", "--lora", f"{lora}@0.7", "--lora", str(files["sd15-unet"]),
         "--embedding", f"{neg}=<neg>", "-o", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as image:
        image.load()
        text = dict(image.text)  # type: ignore[attr-defined]
        saved = image.convert("RGB")
    assert [(e["name"], e["scale"]) for e in json.loads(text["loras"])] == [
        ("both.safetensors", 0.7),
        ("unet.safetensors", 1.0),
    ]
    assert json.loads(text["embeddings"])[0]["token"] == "<neg>"
    expected = engines["sd15"].generate(
        request(
            prompt="a <neg> lighthouse",
            loras=loras_of((lora, 0.7), (files["sd15-unet"], 1.0)),
            embeddings=(Embedding(str(neg), "<neg>"),),
        )
    )
    assert_images_equal([saved], expected.images)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora", "missing.safetensors"], "loras[0].source='missing.safetensors' is not allowed"),
        (["--lora", "{unet}@strong"], "--lora='{unet}@strong' is not allowed: expected SOURCE[@SCALE]"),
        (["--lora", "{unet}@20"], "scale=20.0 is not allowed"),
        (["--lora", "@0.5"], "--lora='@0.5' is not allowed"),
        (["--embedding", "{neg}="], "--embedding='{neg}=' is not allowed: expected SOURCE[=TOKEN]"),
        (["--embedding", "missing.safetensors=<x>"], "embeddings[0].source='missing.safetensors'"),
    ],
)
def test_cli_bad_lora_and_embedding_values_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Path], flags: list[str], message: str
) -> None:
    names = {"unet": files["sd15-unet"], "neg": files["sd15-neg"]}
    flags = [flag.format(**names) for flag in flags]
    out = tmp_path / "never.png"
    code = main(["generate", "a", "--model", "tiny:sd15", "--device", "cpu", "--steps", "1", "-o", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("t2i: error: "), err
    assert message.format(**names) in err
    assert not out.exists()


def test_cli_from_a_png_made_with_loras_needs_the_same_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Path]
) -> None:
    first = tmp_path / "first.png"
    lora, neg = files["sd15-both"], files["sd15-neg"]
    common = ["--steps", str(STEPS), "--device", "cpu"]
    assert main(["generate", "a <neg>", "--model", "tiny:sd15", "--seed", "4", "--lora", f"{lora}@0.7",
                 "--embedding", f"{neg}=<neg>", "-o", str(first), *common]) == 0  # fmt: skip
    capsys.readouterr()
    # The PNG names the files by name and hash, not path: without them the run cannot be made again.
    assert main(["generate", "--from", str(first), "-o", str(tmp_path / "x.png"), *common]) == 2
    err = capsys.readouterr().err
    assert "--lora for each file it was made with, in this order: both.safetensors (sha256 " in err
    other = ["--lora", str(files["sd15-unet"]), "--embedding", str(neg)]
    assert main(["generate", "--from", str(first), "-o", str(tmp_path / "y.png"), *other, *common]) == 2
    assert "both.safetensors" in capsys.readouterr().err
    again = tmp_path / "again.png"
    given = ["--lora", str(lora), "--embedding", str(neg)]  # the scale and token come from the PNG
    assert main(["generate", "--from", str(first), "-o", str(again), *given, *common]) == 0
    with Image.open(first) as a, Image.open(again) as b:
        assert_images_equal([a.convert("RGB")], [b.convert("RGB")])
        assert json.loads(b.text["loras"])[0]["scale"] == 0.7  # type: ignore[attr-defined]


def test_a_hub_lora_comes_from_the_local_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engines: dict[str, Any], files: dict[str, Path]
) -> None:
    import shutil

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repository = tmp_path / "hub" / "models--someone--pixel-lora"
    snapshot = repository / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("a" * 40)
    shutil.copy(files["sd15-unet"], snapshot / "pixel.safetensors")
    engine = engines["sd15"]
    from_hub = engine.generate(request(loras=(Lora("someone/pixel-lora", 0.6),)))
    assert_images_equal(from_hub.images, engine.generate(request(loras=(Lora(str(files["sd15-unet"]), 0.6),))).images)
    assert json.loads(from_hub.metadata()["loras"])[0]["name"] == "someone/pixel-lora/pixel.safetensors"
    with pytest.raises(InvalidRequestError, match="HF_HUB_OFFLINE=1 forbids downloading it"):
        engine.resolve(request(loras=(Lora("someone/not-cached"),)))


def test_around_run_holds_conditioning_and_the_run_for_every_conditioner_of_the_family(
    monkeypatch: pytest.MonkeyPatch, engines: dict[str, Any]
) -> None:
    """`Conditioner.around_run`, the hook t2i-lora takes its turn in: around every request of the family."""
    import contextlib
    import types

    from t2i_core import Conditioner, get_registry, hookimpl

    events: list[str] = []

    class Probe(Conditioner):
        name = "probe"
        families = ("sd15",)

        def wants(self, request: Any) -> bool:
            return False  # around_run is held all the same

        @contextlib.contextmanager
        def around_run(self, engine: Any, request: Any) -> Any:
            assert request.seed is not None  # resolved
            events.append("enter")
            yield
            events.append("exit")

    class Elsewhere(Probe):
        name = "elsewhere"
        families = ("kandinsky22",)

        def around_run(self, engine: Any, request: Any) -> Any:
            raise AssertionError("called for a family it does not serve")

    engine = engines["sd15"]
    run = engine.provider.run

    def recording_run(*args: Any, **kwargs: Any) -> Any:
        events.append("run")
        return run(*args, **kwargs)

    monkeypatch.setattr(engine.provider, "run", recording_run)
    registry = get_registry()
    plugin = types.SimpleNamespace(
        register_conditioners=hookimpl(lambda register: [register(Probe()), register(Elsewhere())])
    )
    registry.register_plugin(plugin, "probe")
    try:
        engine.generate(request())
    finally:
        registry.unregister_plugin("probe")
    assert events == ["enter", "run", "exit"]
