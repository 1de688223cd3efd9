"""LoRA adapters and embeddings inside an engine's shared weights (imports torch, diffusers and peft).

One `SharedWeights` per set of shared weights (keyed by the denoiser, as t2i-controlnet keys
its ControlNets) records what was loaded into them: each adapter file once, under a name made from
its content hash; each embedding's tokens, in the order they were added to the text encoders.
A request's run holds a turn (`t2i_core.kit.Turns`) during which the weights compute exactly what it
asked for. Three ways to make them do so, chosen at load time by the engine's accelerators:

- **plain**: every adapter stays loaded; `set_adapters(names, adapter_weights=scales)` picks the
  request's, `disable_lora()` none. Bit-exact with raw diffusers.
- **fuse** (``fuse_lora`` accelerator): the active set is fused into the weights, and the fused
  layers' original weights are kept, so that unfusing restores them exactly.
- **hotswap** (with ``compile`` or ``compile-regional``): a fixed number of adapter slots whose
  weights are swapped in place (diffusers' hot-swap), all always active, so that switching
  LoRAs or scales changes no compiled code.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs

from t2i_core import (
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    UnsupportedFeatureError,
    get_registry,
    loading_lock,
)
from t2i_core.kit import SharedState, Turns, denoiser, env_int

from ._files import EmbeddingFile, LoraFile, embedding_file, lora_file

if TYPE_CHECKING:
    from t2i_core import Engine, GenerationRequest

#: text encoder attribute → its tokenizer's attribute
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
FUSE_ACCELERATOR = "fuse_lora"
#: the families whose CLIP text encoders take textual-inversion embeddings (the UNet families)
EMBEDDING_FAMILIES = ("sd15", "sdxl")
EMBEDDINGS_FEATURE = "textual-inversion embeddings (embeddings)"
#: the largest LoRA rank that hot-swap slots take (diffusers' ``enable_lora_hotswap(target_rank=...)``)
HOTSWAP_RANK_ENV = "T2I_LORA_MAX_RANK"
DEFAULT_HOTSWAP_RANK = 128
_SLOT = "t2i_slot_{}"


@attrs.frozen
class PlannedLora:
    file: LoraFile
    scale: float
    #: the request field that named it, for errors
    field: str


@attrs.frozen
class PlannedEmbedding:
    file: EmbeddingFile
    field: str


@attrs.frozen
class Plan:
    """A request's LoRAs and embeddings, resolved to files and checked against the engine."""

    loras: tuple[PlannedLora, ...] = ()
    embeddings: tuple[PlannedEmbedding, ...] = ()

    def key(self) -> tuple[tuple[str, float], ...]:
        """What the weights must compute: the adapters, by content, in order, with their scales."""
        return tuple((lora.file.digest, lora.scale) for lora in self.loras)


@attrs.define(eq=False)
class SharedWeights:
    """What has been done to one set of shared weights, and the turns of the runs that use them."""

    mode: str
    hotswap_rank: int = DEFAULT_HOTSWAP_RANK
    turns: Turns = attrs.Factory(Turns)
    #: adapter name → its file, for every adapter loaded (plain and fuse modes)
    adapters: dict[str, LoraFile] = attrs.Factory(dict)
    #: hot-swap slots: the digest of the adapter in each
    slots: list[str] = attrs.Factory(list)
    #: hot-swap: slot → module name → the layer's scaling at weight 1 (alpha / rank of the adapter in it)
    slot_scalings: dict[str, dict[str, float]] = attrs.Factory(dict)
    hotswap_enabled: bool = False
    #: the `Plan.key` the weights compute now; None = unknown (a change failed half-way)
    active: tuple[tuple[str, float], ...] | None = ()
    #: text encoder attribute → every token added to it, in order (token ids follow this order)
    tokens: dict[str, list[str]] = attrs.Factory(dict)
    #: token → its embedding file and every token it added (several for a multi-vector embedding)
    embeddings: dict[str, tuple[EmbeddingFile, tuple[str, ...]]] = attrs.Factory(dict)
    #: fuse mode: fused layer → copies of its weight and bias from before any fusing
    pristine: dict[Any, tuple[Any, Any]] = attrs.Factory(dict)


@attrs.define
class EngineState:
    """One engine's own part: how many of the shared tokens its tokenizers hold."""

    synced: dict[str, int] = attrs.Factory(dict)


_SHARED: SharedState[SharedWeights] = SharedState()


def shared_weights(engine: Engine) -> SharedWeights:
    """The state of `engine`'s weights, shared by every engine over them (made on first use)."""
    return _SHARED.get(
        engine.pipeline, lambda _pipeline: SharedWeights(mode=_mode(engine.accelerators), hotswap_rank=_hotswap_rank())
    )


def _mode(accelerators: tuple[str, ...]) -> str:
    # A compiled denoiser gets its adapters hot-swapped in place rather than switched: no recompile.
    if any("denoiser" in _compiles(name) for name in accelerators):
        return "hotswap"
    return "fuse" if FUSE_ACCELERATOR in accelerators else "plain"


def _compiles(accelerator: str) -> tuple[str, ...]:
    """What the accelerator `accelerator` (a name, or ``NAME@VALUE``) compiles (`Accelerator.compiles`);
    nothing when unknown."""
    found = get_registry().accelerators.get(accelerator.rpartition("@")[0] or accelerator)
    return found.compiles if found is not None else ()


def _check_accelerators_take_loras(accelerators: tuple[str, ...]) -> None:
    """Refuse LoRAs on an engine with an accelerator that declares it cannot take them (`Accelerator.refuses`)."""
    registry = get_registry()
    for spec in accelerators:
        found = registry.accelerators.get(spec.rpartition("@")[0] or spec)
        if found is not None and found.refuses.get("loras"):
            raise IncompatibleAcceleratorsError([found.name, "loras"], found.refuses["loras"])


def _hotswap_rank() -> int:
    return env_int(HOTSWAP_RANK_ENV, DEFAULT_HOTSWAP_RANK, what="a LoRA rank")


def engine_state(engine: Engine) -> EngineState:
    from . import LoraConditioner

    state = engine.state.get(LoraConditioner.name)
    if state is None:
        state = engine.state[LoraConditioner.name] = EngineState()
    return state


# -- planning: files and checks, no weights --------------------------------------------------


def plan(engine: Engine, request: GenerationRequest) -> Plan:
    """Resolve the request's files and refuse, before any work, what cannot go into this engine."""
    if not request.loras and not request.embeddings:
        return Plan()
    if request.embeddings and engine.family not in EMBEDDING_FAMILIES:
        raise UnsupportedFeatureError(engine.family, EMBEDDINGS_FEATURE, EMBEDDING_FAMILIES)
    pipeline = engine.pipeline
    shared = shared_weights(engine)
    if request.loras and "fuse_qkv" in engine.accelerators:
        raise IncompatibleAcceleratorsError(
            ["fuse_qkv", "loras"], "LoRA adapters target the separate query/key/value projections that fuse_qkv merges"
        )
    if request.loras:
        _check_accelerators_take_loras(engine.accelerators)
    loras: list[PlannedLora] = []
    for index, lora in enumerate(request.loras):
        field = f"loras[{index}].source"
        found = lora_file(
            lora.source,
            lora.weight_name,
            field,
            family=engine.family,
            denoiser=denoiser(pipeline),
            has_text_encoder_2="text_encoder_2" in _lora_components(pipeline),
        )
        same = next((i for i, p in enumerate(loras) if p.file.digest == found.digest), None)
        if same is not None:
            raise InvalidRequestError(
                field, lora.source, f"a LoRA not listed already (loras[{same}] is the same file: give it one scale)"
            )
        if shared.mode == "hotswap":
            _check_hotswap(found, field, shared.hotswap_rank)
        loras.append(PlannedLora(found, lora.scale, field))
    widths = {
        attribute: int(encoder.get_input_embeddings().weight.shape[-1])
        for attribute in TOKENIZERS
        if (encoder := getattr(pipeline, attribute, None)) is not None
    }
    embeddings: list[PlannedEmbedding] = []
    for index, embedding in enumerate(request.embeddings):
        field = f"embeddings[{index}].source"
        found_embedding = embedding_file(embedding.source, embedding.token, field, family=engine.family, widths=widths)
        _check_token(engine, shared, found_embedding, embeddings, f"embeddings[{index}].token")
        embeddings.append(PlannedEmbedding(found_embedding, field))
    return Plan(tuple(loras), tuple(embeddings))


def _check_hotswap(found: LoraFile, field: str, rank: int) -> None:
    if found.text_encoder or found.text_encoder_2:
        raise IncompatibleAcceleratorsError(
            ["compile", "loras"],
            f"{found.file.name} adapts a text encoder, and diffusers hot-swaps only the denoiser's adapters; "
            "load the engine without compile to use it",
        )
    if found.rank > rank:
        raise InvalidRequestError(
            field,
            found.file.source,
            f"a LoRA of rank <= {rank} with compile (the hot-swap slots' rank; set ${HOTSWAP_RANK_ENV} before "
            f"loading to raise it): {found.file.name} has rank {found.rank}",
        )


def _check_token(
    engine: Engine, shared: SharedWeights, found: EmbeddingFile, planned: list[PlannedEmbedding], field: str
) -> None:
    if any(p.file.token == found.token for p in planned):
        raise InvalidRequestError(field, found.token, "a token no other embedding of this request uses")
    loaded = shared.embeddings.get(found.token)
    if loaded is not None:
        if loaded[0].digest != found.digest:
            raise InvalidRequestError(
                field,
                found.token,
                f"a token not already taken in this model's weights ({loaded[0].file.name} was loaded under it; "
                "pass another token=)",
            )
        return
    for attribute in found.keys:
        tokenizer = getattr(engine.pipeline, TOKENIZERS[attribute])
        if found.token in tokenizer.get_vocab() or f"{found.token}_1" in tokenizer.get_vocab():
            raise InvalidRequestError(
                field, found.token, "a token that is not already a word of the tokenizer's vocabulary (pass token=)"
            )


# -- holding the weights for one run ---------------------------------------------------------


@contextlib.contextmanager
def hold(engine: Engine, request: GenerationRequest) -> Iterator[None]:
    """The run's turn: the weights compute `request`'s LoRAs and know its embeddings until it ends."""
    shared = shared_weights(engine)
    state = engine_state(engine)
    wanted = plan(engine, request)
    key = wanted.key()

    def ready() -> bool:
        return shared.active == key and all(
            e.file.token in shared.embeddings and shared.embeddings[e.file.token][0].digest == e.file.digest
            for e in wanted.embeddings
        )

    with shared.turns.hold(ready, lambda: _change(engine, shared, state, wanted, key)):
        sync_tokenizers(engine, shared, state)
        _check_prompts(engine, shared, request, wanted)
        yield


def _change(
    engine: Engine, shared: SharedWeights, state: EngineState, wanted: Plan, key: tuple[tuple[str, float], ...]
) -> None:
    """Make the weights compute `wanted` (no other run holds a turn)."""
    shared.active = None
    if shared.mode == "fuse":
        restore_fused(shared)
    sync_tokenizers(engine, shared, state)
    if shared.mode == "hotswap":
        _load_slots(engine, shared, wanted)
        _activate_slots(engine, shared, wanted)
    else:
        for lora in wanted.loras:
            _load_adapter(engine, shared, lora)
        _activate(engine, shared, wanted)
    for embedding in wanted.embeddings:
        if embedding.file.token not in shared.embeddings:
            _load_embedding(engine, shared, state, embedding)
    shared.active = key


def _load_adapter(engine: Engine, shared: SharedWeights, lora: PlannedLora) -> None:
    name = lora.file.adapter_name
    if name in shared.adapters:
        return
    pipeline = engine.pipeline
    try:
        with loading_lock, warnings.catch_warnings():
            # peft warns that a model holds several adapters: that is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipeline.load_lora_weights(str(lora.file.file.path), adapter_name=name)
    except Exception as exc:
        _forget_adapter(pipeline, name)
        raise _load_error(engine, lora, exc) from exc
    _check_loaded(engine, lora, name)
    shared.adapters[name] = lora.file


def _check_loaded(engine: Engine, lora: PlannedLora, name: str) -> None:
    """Refuse a file none of whose layers went in (diffusers skips keys of layers a model lacks)."""
    if not any(name in names for names in engine.pipeline.get_list_adapters().values()):
        _forget_adapter(engine.pipeline, name)
        raise InvalidRequestError(
            lora.field,
            lora.file.file.source,
            f"a LoRA for this {engine.family} model ({lora.file.file.name} adapts none of its layers)",
        )


def _load_error(engine: Engine, lora: PlannedLora, exc: Exception) -> InvalidRequestError:
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    return InvalidRequestError(
        lora.field,
        lora.file.file.source,
        f"a LoRA diffusers can load into this {engine.family} model ({lora.file.file.name}: {reason[:300]})",
    )


def _forget_adapter(pipeline: Any, name: str) -> None:
    """Remove what a failed load left of adapter `name` (its layers in some components)."""
    with contextlib.suppress(Exception):
        if any(name in names for names in pipeline.get_list_adapters().values()):
            pipeline.delete_adapters(name)


def _activate(engine: Engine, shared: SharedWeights, wanted: Plan) -> None:
    pipeline = engine.pipeline
    names = [lora.file.adapter_name for lora in wanted.loras]
    if not names:
        if shared.adapters:
            pipeline.disable_lora()
        return
    pipeline.enable_lora()
    pipeline.set_adapters(names, adapter_weights=[lora.scale for lora in wanted.loras])
    if shared.mode == "fuse":
        _fuse(pipeline, shared, names)


# -- fuse mode --------------------------------------------------------------------------------


def _lora_components(pipeline: Any) -> list[str]:
    return [name for name in pipeline._lora_loadable_modules if getattr(pipeline, name, None) is not None]


def _lora_layers(module: Any) -> Iterator[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer):
            yield name, layer


def _fuse(pipeline: Any, shared: SharedWeights, names: list[str]) -> None:
    """Fuse adapters `names` (already set with their scales), keeping the layers' original weights first."""
    for component in _lora_components(pipeline):
        for _, layer in _lora_layers(getattr(pipeline, component)):
            if layer not in shared.pristine and any(name in layer.lora_A for name in names):
                base = layer.get_base_layer()
                bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
                shared.pristine[layer] = (base.weight.detach().clone(), bias)
    pipeline.fuse_lora(components=_lora_components(pipeline), lora_scale=1.0, adapter_names=names)


def restore_fused(shared: SharedWeights) -> None:
    """Put back the original weights of every fused layer, bit for bit.

    peft's unmerge subtracts what merging added, which is not exact in floating point (in
    float16 it drifts further with each fuse and unfuse: diffusers #5313); copying the kept
    originals back is.
    """
    import torch

    with torch.no_grad():
        for layer, (weight, bias) in shared.pristine.items():
            if not layer.merged:
                continue
            base = layer.get_base_layer()
            base.weight.data.copy_(weight)
            if bias is not None:
                base.bias.data.copy_(bias)
            layer.merged_adapters.clear()


# -- hotswap mode -----------------------------------------------------------------------------


def _load_slots(engine: Engine, shared: SharedWeights, wanted: Plan) -> None:
    pipeline = engine.pipeline
    for index, lora in enumerate(wanted.loras):
        if index < len(shared.slots) and shared.slots[index] == lora.file.digest:
            continue
        slot = _SLOT.format(index)
        swap = index < len(shared.slots)
        if not swap:
            # Before each new slot's first load: it pads the slot to the target rank and keeps
            # its scalings in tensors, so that later adapters swap in without new code.
            pipeline.enable_lora_hotswap(target_rank=shared.hotswap_rank, check_compiled="ignore")
        try:
            with loading_lock:
                pipeline.load_lora_weights(str(lora.file.file.path), adapter_name=slot, hotswap=swap)
        except Exception as exc:
            if swap:
                shared.slots[index] = ""  # its weights may be half swapped: never reuse them as they are
            else:
                _forget_adapter(pipeline, slot)
            raise _load_error(engine, lora, exc) from exc
        if not swap:
            _check_loaded(engine, lora, slot)
        if swap:
            shared.slots[index] = lora.file.digest
        else:
            shared.slots.append(lora.file.digest)
        shared.slot_scalings[slot] = _scalings_as_tensors(denoiser(pipeline), slot)


def _scalings_as_tensors(model: Any, slot: str) -> dict[str, float]:
    """Each layer's scaling of `slot` at weight 1, with the layer's scaling made a tensor if it was a float."""
    import torch

    scalings = {}
    for name, layer in _lora_layers(model):
        value = layer.scaling.get(slot)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            scalings[name] = float(value.item())
        else:
            scalings[name] = float(value)
            layer.scaling[slot] = torch.tensor(value, device=layer.get_base_layer().weight.device)
    return scalings


def _activate_slots(engine: Engine, shared: SharedWeights, wanted: Plan) -> None:
    """Every slot active; the request's scales (0 for the slots it does not use) written in place."""
    slots = [_SLOT.format(index) for index in range(len(shared.slots))]
    if not slots:
        return
    scales = {_SLOT.format(index): lora.scale for index, lora in enumerate(wanted.loras)}
    for name, layer in _lora_layers(denoiser(engine.pipeline)):
        present = [slot for slot in slots if slot in layer.lora_A]
        if list(layer.active_adapters) != present:
            layer.set_adapter(present)
        for slot in present:
            layer.scaling[slot].fill_(shared.slot_scalings[slot].get(name, 0.0) * scales.get(slot, 0.0))


# -- embeddings -------------------------------------------------------------------------------


def _load_embedding(engine: Engine, shared: SharedWeights, state: EngineState, embedding: PlannedEmbedding) -> None:
    from safetensors.torch import load_file

    found = embedding.file
    pipeline = engine.pipeline
    tensors = load_file(str(found.file.path))
    added: tuple[str, ...] = ()
    for attribute, key in found.keys.items():
        tokenizer = getattr(pipeline, TOKENIZERS[attribute])
        before = len(tokenizer)
        try:
            with loading_lock:
                pipeline.load_textual_inversion(
                    tensors[key], token=found.token, tokenizer=tokenizer, text_encoder=getattr(pipeline, attribute)
                )
        except ValueError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidRequestError(
                embedding.field, found.file.source, f"an embedding diffusers can load ({found.file.name}: {reason})"
            ) from exc
        added = tuple(tokenizer.convert_ids_to_tokens(list(range(before, len(tokenizer)))))
        shared.tokens.setdefault(attribute, []).extend(added)
        state.synced[attribute] = len(shared.tokens[attribute])
    shared.embeddings[found.token] = (found, added)


def sync_tokenizers(engine: Engine, shared: SharedWeights, state: EngineState) -> None:
    """Add to this engine's tokenizers the tokens other engines added to the shared text encoders.

    Tokenizers are each engine's own copies, the text encoders' embedding matrices are shared:
    a token must have the same id in every engine, the row its vectors were written to. Adding
    the shared tokens in the order they were first added gives each the same id everywhere.
    """
    for attribute, tokens in shared.tokens.items():
        have = state.synced.get(attribute, 0)
        if have == len(tokens):
            continue
        tokenizer = getattr(engine.pipeline, TOKENIZERS[attribute])
        first_id = len(tokenizer) - have
        for token in tokens[have:]:
            tokenizer.add_tokens(token)
        if tokenizer.convert_tokens_to_ids(tokens[-1]) != first_id + len(tokens) - 1:
            raise RuntimeError(f"t2i-lora: the {TOKENIZERS[attribute]} of this engine is out of step with its weights")
        state.synced[attribute] = len(tokens)


_TEXT_FIELDS = ("prompt", "negative_prompt")
_TEXT_OPTIONS = ("prompt_2", "negative_prompt_2")


def _check_prompts(engine: Engine, shared: SharedWeights, request: GenerationRequest, wanted: Plan) -> None:
    """Refuse a prompt that uses the token of an embedding loaded into these weights but not listed.

    Its image would depend on what other requests loaded before: the token would be the
    embedding after they did and plain letters before. Listing the embedding makes it exact.
    """
    if not shared.embeddings:
        return
    listed = {token for e in wanted.embeddings for token in shared.embeddings[e.file.token][1]}
    foreign = {token: found for found, added in shared.embeddings.values() for token in added if token not in listed}
    if not foreign:
        return
    tokenizer = engine.pipeline.tokenizer
    texts = [(field, getattr(request, field)) for field in _TEXT_FIELDS]
    texts += [(f"options[{name!r}]", request.options.get(name)) for name in _TEXT_OPTIONS]
    for field, text in texts:
        if not isinstance(text, str) or not text:
            continue
        used = [token for token in tokenizer.tokenize(text) if token in foreign]
        if used:
            found = foreign[used[0]]
            raise InvalidRequestError(
                field,
                text,
                f"text without {used[0]!r}, the token of the embedding {found.file.name} loaded into this model, "
                "or that embedding listed in embeddings= to use it",
            )
