"""``t2i plugin new NAME --role ROLE``: write a ready plugin package from a template.

The package holds a ``pyproject.toml`` with the ``t2i`` entry point, the module with the hook
implementation and documented methods to adapt, a README and a test file that runs the
conformance kit (`t2i_core.testing`). As written it works, so its tests pass at once; each
``TODO`` says what to change to make it yours. Nothing here imports torch.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from ..errors import InvalidRequestError

ROLES = ("provider", "conditioner", "accelerator")
#: longest plugin name: it names a folder, a module and a test file (``tests/test_<module>.py``)
MAX_NAME = 64
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")


def create(name: str, role: str, parent: str | Path = ".") -> Path:
    """Write the package of plugin `name` with `role` into ``parent/t2i-<name>/``; return that folder.

    Refuses (`InvalidRequestError`) a malformed name, a name already registered for that role,
    an unknown role, and a folder that exists: nothing is ever overwritten.
    """
    if role not in ROLES:
        raise InvalidRequestError("--role", role, "one of " + ", ".join(ROLES))
    plain = re.sub(r"^t2i[-_]", "", name) if isinstance(name, str) else name
    if not isinstance(plain, str) or not _NAME.match(plain) or len(plain) > MAX_NAME:
        raise InvalidRequestError(
            "NAME",
            name,
            f"a lowercase name of letters and digits, words joined by - or _, at most {MAX_NAME} characters "
            "(e.g. my-family)",
        )
    _check_free(plain, role)
    fields = _fields(plain, role)
    folder = Path(parent).expanduser() / fields["distribution"]
    if not folder.parent.is_dir():
        raise InvalidRequestError("--dir", str(parent), "an existing folder")
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"{fields['module']}/__init__.py": _MODULES[role],
        f"tests/test_{fields['module']}.py": _TESTS[role],
    }
    try:
        folder.mkdir()  # fails if it exists: never overwrite
    except FileExistsError:
        raise InvalidRequestError(
            "NAME", name, f"a plugin whose folder does not exist yet ({folder} exists; nothing was written)"
        ) from None
    except OSError as exc:
        raise InvalidRequestError("--dir", str(parent), f"a folder you can write to ({exc.strerror or exc})") from None
    for relative, template in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(string.Template(template).substitute(fields), encoding="utf-8")
    return folder


def _check_free(name: str, role: str) -> None:
    """Refuse a name an installed plugin already registered for this role (the kit would test that one)."""
    from ..registry import get_registry

    registry = get_registry()
    tables: dict[str, set[str]] = {
        "provider": set(registry.providers),
        "conditioner": set(registry.conditioners),
        "accelerator": {*registry.accelerators, *registry.presets},
    }
    taken = tables[role]
    if name in taken:
        raise InvalidRequestError("NAME", name, f"a {role} name no installed plugin registers yet ({name!r} is taken)")


def _fields(name: str, role: str) -> dict[str, str]:
    from .. import __version__

    major, minor = (int(part) for part in __version__.split(".")[:2])
    module = "t2i_" + name.replace("-", "_")
    words = re.split(r"[-_]", name)
    return {
        "name": name,
        "role": role,
        "distribution": f"t2i-{name.replace('_', '-')}",
        "module": module,
        "class_name": "".join(word.capitalize() for word in words),
        "hook": {"provider": "register_providers", "conditioner": "register_conditioners"}.get(
            role, "register_accelerators"
        ),
        "core_requirement": f"t2i-core>={major}.{minor},<{major}.{minor + 1}",
        "test_requirements": ", ".join(f'"{requirement}"' for requirement in TEST_REQUIREMENTS[role]),
    }


#: The ``test`` extra of each role: t2i's test kit and what its cross-family tests run against.
#: A provider's kit checks that it claims no shipped family's checkpoint (t2i-sd15's tiny one) and
#: that a conditioner restricted to other families refuses it (t2i-controlnet's); a conditioner's
#: and an accelerator's run on tiny:sd15, and a conditioner restricted to some families is
#: refused on another (t2i-sdxl's tiny checkpoint).
TEST_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "provider": ("t2i-core[testing]", "t2i-sd15", "t2i-controlnet"),
    "conditioner": ("t2i-core[testing]", "t2i-sd15", "t2i-sdxl"),
    "accelerator": ("t2i-core[testing]", "t2i-sd15"),
}


_PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "${distribution}"
version = "0.1.0"
description = "t2i ${role}: ${name}"  # TODO: one line on what it does
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["${core_requirement}"]

[project.optional-dependencies]
test = [${test_requirements}]

# How t2i finds the plugin: the name on the left is the plugin's name in `t2i plugins`.
[project.entry-points.t2i]
${name} = "${module}"

[tool.setuptools]
packages = ["${module}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
# The libraries' own deprecation notices are not the plugin's to fix; t2i's stay visible.
filterwarnings = [
    'ignore::DeprecationWarning:(diffusers|transformers|torch|huggingface_hub|accelerate)\\b',
    'ignore::FutureWarning:(diffusers|transformers|torch|huggingface_hub|accelerate)\\b',
]
"""

_README = """\
# ${distribution}

A t2i ${role} plugin. TODO: say what it does.

Made with `t2i plugin new ${name} --role ${role}`; it works as generated, and each `TODO` in
`${module}/__init__.py` says what to change to make it yours.

```bash
python -m pip install -e ".[test]"   # the plugin, the t2i test kit (and tiny:sd15 for a conditioner or accelerator)
t2i plugins                          # lists ${name}
python -m pytest                     # the t2i conformance kit against the plugin
```

The tests in `tests/` subclass the kit's conformance class for a ${role}: they check what
every ${role} promises (registering without importing torch, refusing bad requests before any
work, images identical to raw diffusers) on a tiny random-weight checkpoint, offline, on CPU.
"""

_PROVIDER = '''\
"""t2i model provider: the ${name} family.

Generated by ``t2i plugin new ${name} --role provider``. As generated it is a working family for
diffusers' ``StableDiffusionPAGPipeline`` (Stable Diffusion 1.x with perturbed-attention
guidance), so that its tests pass from the first run. Each TODO says what to change for your
family. Keep imports of torch, diffusers and transformers inside methods: registering must stay instant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from t2i_core import FamilyDefaults, ModelProvider, Option, hookimpl

if TYPE_CHECKING:
    from t2i_core import GenerationRequest

__version__ = "0.1.0"


class ${class_name}(ModelProvider):
    """The ${name} family."""

    #: the family name: load(..., family="${name}"), --family ${name}, tiny:${name}
    name = "${name}"
    #: short names users may pass as a model, and the hub ids they stand for. TODO: your checkpoints
    aliases: ClassVar[Mapping[str, str]] = {}
    #: the model_index.json ``_class_name`` values of this family's checkpoints. TODO: your pipeline class
    pipeline_classes = ("StableDiffusionPAGPipeline",)
    #: steps and guidance when a request leaves them None; the size defaults to the checkpoint's own
    defaults = FamilyDefaults(num_inference_steps=50, guidance_scale=7.5)
    #: family options: GenerationRequest(options={"pag_scale": 2.0}), --option pag_scale=2.0
    options = (
        Option(name="pag_scale", type=float, default=3.0, minimum=0.0, help="perturbed-attention guidance scale"),
    )
    #: one line for `t2i plugins`
    description = "${name}: Stable Diffusion 1.x with perturbed-attention guidance"  # TODO
    #: bump when build_tiny changes, so that cached tiny checkpoints are rebuilt
    tiny_version = 1
    #: the shared named schedulers the pipeline runs (None = all); `named_schedulers` adds its own
    schedulers = None

    def call_kwargs(self, request: GenerationRequest, options: Mapping[str, Any]) -> dict[str, Any]:
        """The pipeline's arguments: t2i's (prompt, size, steps, guidance, num_images) and the options."""
        kwargs = super().call_kwargs(request, options)
        kwargs["pag_scale"] = options["pag_scale"]
        return kwargs

    def check_request(self, pipeline: Any, request: GenerationRequest) -> None:
        """Refuse, before any work, a request this pipeline cannot run: raise t2i_core.InvalidRequestError
        naming the field (e.g. sizes that are not whole patches). The request's defaults are filled in."""

    # Other methods to override when the family needs it (see the ModelProvider docstrings):
    # load_pipeline(source, load_kwargs, model_index), native_size(pipeline), share(pipeline),
    # scheduler_owner(pipeline), check(request), run(pipeline, kwargs, progress).

    def build_tiny(self, folder: Path) -> None:
        """Write tiny:${name}, a small random-weight checkpoint, into `folder` (offline, deterministic).

        TODO: build your pipeline's components, as small as they go, and save_pretrained them.
        """
        import shutil

        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPAGPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        from t2i_core.tiny import clip_text_config, clip_tokenizer

        tokenizer = clip_tokenizer(folder / "_tokenizer")  # a CLIP tokenizer built without the network
        unet = UNet2DConditionModel(
            sample_size=32,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
        )
        scheduler = PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
        )
        pipeline = StableDiffusionPAGPipeline(
            unet=unet,
            vae=vae,
            text_encoder=CLIPTextModel(clip_text_config(tokenizer)),
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            pag_applied_layers="mid",
        )
        pipeline.save_pretrained(folder)
        shutil.rmtree(folder / "_tokenizer", ignore_errors=True)


@hookimpl
def ${hook}(register: Callable[[ModelProvider], None]) -> None:
    register(${class_name}())
'''

_CONDITIONER = '''\
"""t2i conditioner: ${name}.

Generated by ``t2i plugin new ${name} --role conditioner``. As generated it is a working prompt
syntax: with ``prompt_weighting="${name}"`` the prompts may hold [comments], which are removed
before the model reads them. Each TODO says what to change. Keep imports of torch, diffusers
and transformers inside prepare() and condition(): registering and wants() must stay instant.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from t2i_core import Call, Conditioner, InvalidRequestError, hookimpl

if TYPE_CHECKING:
    from t2i_core import Engine, GenerationRequest

__version__ = "0.1.0"

_COMMENT = re.compile(r"\\[[^\\[\\]]*\\]")


class ${class_name}(Conditioner):
    """Removes [comments] from prompts written for prompt_weighting="${name}"."""

    #: the name `t2i plugins` shows; unique among conditioners
    name = "${name}"
    #: the prompt_weighting value it implements (None if it is not a prompt syntax)
    weighting = "${name}"
    #: the families it works with (None = all): a request for another family is refused before any work
    families = None
    #: what it does, for "family 'x' does not support ..."
    feature = "${name} prompts"
    #: conditioners run in ascending order (negative prompts: 10, compel: 20, controlnet: 50)
    order = 60
    description = "removes [comments] from prompts (prompt_weighting='${name}')"  # TODO

    def wants(self, request: GenerationRequest) -> bool:
        """Whether this conditioner has work to do for `request`: cheap, and no heavy imports."""
        return request.prompt_weighting == self.weighting

    def prepare(self, engine: Engine, request: GenerationRequest) -> None:
        """Refuse, before any work, what condition() could not do: raise InvalidRequestError naming the field."""
        for field in ("prompt", "negative_prompt"):
            text = getattr(request, field)
            if text is not None and re.search(r"[\\[\\]]", _COMMENT.sub("", text)):
                raise InvalidRequestError(field, text, "text whose [comments] are closed and not nested")

    def condition(self, engine: Engine, request: GenerationRequest, call: Call) -> None:
        """Turn the request into pipeline arguments: edit call.kwargs (or replace call.pipeline).

        Per-engine state made once (an encoder, a loaded model) belongs in engine.state[self.name].
        """
        call.kwargs["prompt"] = _without_comments(request.prompt)
        if request.negative_prompt is not None:  # with a prompt syntax, the negative prompt is ours too
            call.kwargs["negative_prompt"] = _without_comments(request.negative_prompt)


def _without_comments(text: str) -> str:
    return " ".join(_COMMENT.sub(" ", text).split())


@hookimpl
def ${hook}(register: Callable[[Conditioner], None]) -> None:
    register(${class_name}())
'''

_ACCELERATOR = '''\
"""t2i accelerator: ${name}.

Generated by ``t2i plugin new ${name} --role accelerator``. As generated it works: it makes the
autoencoder decode a batch one image at a time (less memory, the same images). Each TODO says
what to change. Keep imports of torch, diffusers and transformers inside the methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from t2i_core import Accelerator, LoadContext, Preset, hookimpl

__version__ = "0.1.0"


class ${class_name}(Accelerator):
    """Decodes a batch one image at a time."""

    #: the name users pass: load(..., accelerators=["${name}"]), --accelerator ${name}
    name = "${name}"
    #: when it is applied, one of t2i_core.PHASES: dtype, quantize, attention, fusion, layout, placement, memory,
    #: cache, compile
    phase = "memory"
    #: the device types it works on; elsewhere it is refused before any weights load
    devices = ("cpu", "cuda", "mps")
    #: accelerators it cannot be combined with
    conflicts = ()
    #: to take a value written ${name}@VALUE, declare it: parameter = t2i_core.AcceleratorParameter(
    #: name="threshold", kind=float, default=0.2, minimum=0, maximum=1); apply then reads self.value
    #: True: the images stay those of plain fp32 (the kit checks it bit for bit on the tiny models)
    lossless = True
    description = "decodes a batch one image at a time (bounded autoencoder memory)"  # TODO

    def check(self, context: LoadContext) -> None:
        """Raise t2i_core.IncompatibleAcceleratorsError when it cannot work in `context` (before loading)."""

    def load_kwargs(self, context: LoadContext) -> dict[str, Any]:
        """Extra from_pretrained arguments (a dtype, a variant); none here."""
        return {}

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        """Change the loaded pipeline in place, once per engine. TODO: what yours does."""
        vae = getattr(pipeline, "vae", None)
        if vae is not None and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()


@hookimpl
def ${hook}(register: Callable[[Accelerator | Preset], None]) -> None:
    register(${class_name}())
'''

_MODULES = {"provider": _PROVIDER, "conditioner": _CONDITIONER, "accelerator": _ACCELERATOR}

_PROVIDER_TEST = '''\
"""The t2i conformance kit against the ${name} family (see t2i's docs/testing.md)."""

from t2i_core.testing import ProviderConformance


class Test${class_name}(ProviderConformance):
    family = "${name}"
    # Images are compared with raw diffusers: AutoPipelineForText2Image on the tiny checkpoint.
    # Override reference_pipeline(folder) when your pipeline loads another way, and declare
    # invalid_requests = {"height": {"height": 72}} for what check_request refuses.
'''

_CONDITIONER_TEST = '''\
"""The t2i conformance kit against the ${name} conditioner (see t2i's docs/testing.md)."""

from t2i_core.testing import ConditionerConformance


class Test${class_name}(ConditionerConformance):
    conditioner = "${name}"
    family = "sd15"  # the tests run on tiny:sd15 (pip install t2i-sd15)
    #: a request it acts on, and the raw diffusers arguments that request amounts to
    wanted = {"prompt": "a cat [note: make it blue] in a jungle", "prompt_weighting": "${name}"}
    reference_kwargs = {"prompt": "a cat in a jungle"}
    #: requests it refuses in prepare(), before any work: the field named → the request
    refused_requests = {"prompt": {"prompt": "a cat [in a jungle", "prompt_weighting": "${name}"}}
'''

_ACCELERATOR_TEST = '''\
"""The t2i conformance kit against the ${name} accelerator (see t2i's docs/testing.md)."""

from typing import Any

from t2i_core.testing import AcceleratorConformance


class Test${class_name}(AcceleratorConformance):
    accelerator = "${name}"
    model = "tiny:sd15"  # pip install t2i-sd15

    def effect(self, engine: Any) -> Any:
        """What the accelerator changes: the kit checks it differs with and without it."""
        return engine.pipeline.vae.use_slicing
'''

_TESTS = {"provider": _PROVIDER_TEST, "conditioner": _CONDITIONER_TEST, "accelerator": _ACCELERATOR_TEST}
