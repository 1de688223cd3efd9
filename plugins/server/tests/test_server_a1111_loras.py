"""``t2i serve --lora-dir/--embeddings-dir``: ``<lora:NAME:WEIGHT>`` tags and embedding words through the
unchanged ``webuiapi`` client give the SDK's images with the explicit `Lora` and `Embedding`; the
folders are listed at ``/sdapi/v1/loras`` and ``/sdapi/v1/embeddings``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import webuiapi
from server_support import running_server
from t2i_server import Limits
from t2i_server._a1111 import prompt_weighting
from t2i_server._jobs import ServedModel, Service, load_model
from t2i_server._serve import _use_folders

from t2i_core import Embedding, GenerationRequest, Lora, clear_cache
from t2i_core.cli import main
from t2i_core.testing import assert_images_equal, tiny_folder

pytest.importorskip("t2i_lora")
from t2i_lora import tiny

MODEL = "tiny:sd15"
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
# What webuiapi sends by default (Euler a, CFG 7), as t2i request fields.
CALL: dict[str, Any] = {"steps": 2, "width": 64, "height": 64, "seed": 8}
FIELDS: dict[str, Any] = {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 8, "guidance_scale": 7.0}
FIELDS["scheduler"] = "euler-ancestral"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served-tags")
    folder = str(tiny_folder("sd15"))
    loras, embeddings = root / "loras", root / "embeddings"
    tiny.lora_file(folder, loras / "style.safetensors", seed=1, text_encoders=True)
    tiny.lora_file(folder, loras / "more" / "style.safetensors", seed=2)  # the same name in a sub-folder
    tiny.embedding_file(folder, embeddings / "grainy.safetensors", token="<x>", vectors=2, seed=6)
    tiny.embedding_file(tiny_folder("sdxl"), embeddings / "xl.safetensors", token="<y>", seed=7)  # another width
    return {"loras": loras, "embeddings": embeddings}


@pytest.fixture(scope="module")
def served(folders: dict[str, Path]) -> Iterator[ServedModel]:
    clear_cache()  # weights of this module's own, with its LoRAs loaded into them
    served = load_model(MODEL, MODEL, device="cpu")
    _use_folders([served], (str(folders["loras"]),), (str(folders["embeddings"]),))
    yield served
    clear_cache()


@pytest.fixture(scope="module")
def api(served: ServedModel) -> Iterator[Any]:
    with running_server(Service([served], Limits())) as url:
        yield webuiapi.WebUIApi(host="127.0.0.1", port=urlsplit(url).port)


def sdk(served: ServedModel, **fields: Any) -> list[Any]:
    request = GenerationRequest(**{**FIELDS, "prompt_weighting": prompt_weighting("sd15"), **fields})
    images: list[Any] = served.engine.generate(request).images
    return images


def test_a_lora_tag_gives_the_sdk_image_with_that_lora(api: Any, served: ServedModel, folders: dict[str, Path]) -> None:
    prompt = "a (red:1.3) cat, [blurry] ((sunny)) background <lora:style:0.8>"
    result = api.txt2img(prompt=prompt, negative_prompt="(deformed:1.2), lowres", **CALL)
    style = Lora(str(folders["loras"] / "style.safetensors"), 0.8)
    expected = sdk(
        served,
        prompt="a (red:1.3) cat, [blurry] ((sunny)) background ",
        negative_prompt="(deformed:1.2), lowres",
        loras=(style,),
    )
    assert_images_equal(result.images, expected)
    untagged = sdk(
        served, prompt="a (red:1.3) cat, [blurry] ((sunny)) background ", negative_prompt="(deformed:1.2), lowres"
    )
    assert result.images[0].tobytes() != untagged[0].tobytes()
    assert result.info["prompt"] == prompt and result.info["infotexts"][0].startswith(prompt)
    # A1111's "Lora hashes": the name and the first 12 hex digits of the file's SHA-256.
    digest = hashlib.sha256((folders["loras"] / "style.safetensors").read_bytes()).hexdigest()[:12]
    assert result.info["extra_generation_params"]["Lora hashes"] == f"style: {digest}"
    assert f'Lora hashes: "style: {digest}", ' in result.info["infotexts"][0]
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]
    # The sub-folder's file of the same name, by its path in the folder.
    deeper = api.txt2img(prompt="a cat <lora:more/style:0.5>", **CALL)
    other = Lora(str(folders["loras"] / "more" / "style.safetensors"), 0.5)
    assert_images_equal(deeper.images, sdk(served, prompt="a cat ", loras=(other,)))


def test_an_embedding_word_gives_the_sdk_image_with_that_embedding(
    api: Any, served: ServedModel, folders: dict[str, Path]
) -> None:
    result = api.txt2img(prompt="a fox", negative_prompt="grainy, blurry", **CALL)
    grainy = Embedding(str(folders["embeddings"] / "grainy.safetensors"), token="grainy")
    assert_images_equal(
        result.images, sdk(served, prompt="a fox", negative_prompt="grainy, blurry", embeddings=(grainy,))
    )


def test_an_unknown_lora_is_a_422_naming_it(api: Any, folders: dict[str, Path]) -> None:
    body = {"prompt": "a cat <lora:stlye:0.8>", **CALL}
    response = httpx.post(f"{api.baseurl}/txt2img", json=body, timeout=120)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "prompt" and "<lora:stlye:0.8>" in response.text and "style" in response.text
    assert str(folders["loras"]) not in response.text  # the server's folders stay private


def test_the_folders_are_listed_as_automatic1111_lists_them(api: Any, folders: dict[str, Path]) -> None:
    listed = api.get_loras()
    assert [(each["name"], each["alias"], each["path"]) for each in listed] == [
        ("style", "style", "style.safetensors"),
        ("more/style", "more/style", "more/style.safetensors"),  # what a tag names it by
    ]
    assert all(isinstance(each["metadata"], dict) for each in listed)
    embeddings = api.get_embeddings()
    assert list(embeddings["loaded"]) == ["grainy"] and list(embeddings["skipped"]) == ["xl"]
    grainy = embeddings["loaded"]["grainy"]
    assert grainy["vectors"] == 2 and grainy["shape"] > 0 and grainy["step"] is None
    # Files added later are found at once; refreshing is accepted and changes nothing.
    tiny.lora_file(str(tiny_folder("sd15")), folders["loras"] / "late.safetensors", seed=9)
    try:
        assert httpx.post(f"{api.baseurl}/refresh-loras").status_code == 200
        assert "late" in [each["name"] for each in api.get_loras()]
    finally:
        (folders["loras"] / "late.safetensors").unlink()


def test_serve_refuses_a_missing_folder_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", MODEL, "--lora-dir", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--lora-dir" in err and "\n" not in err and "loading" not in err


def test_the_native_api_reads_the_tags_too(api: Any, served: ServedModel, folders: dict[str, Path]) -> None:
    from server_support import decode_png

    base = api.baseurl.removesuffix("/sdapi/v1")
    fields: dict[str, Any] = {"prompt": "a cat <lora:style:0.8>", "num_inference_steps": 2, "seed": 7}
    fields.update(height=64, width=64)
    response = httpx.post(f"{base}/v1/generations", json=fields, timeout=120)
    assert response.status_code == 200, response.text
    style = Lora(str(folders["loras"] / "style.safetensors"), 0.8)
    expected = served.engine.generate(GenerationRequest(**{**fields, "prompt": "a cat "}, loras=(style,))).images
    assert_images_equal([decode_png(image) for image in response.json()["images"]], expected)
    assert response.json()["request"]["prompt"] == "a cat <lora:style:0.8>"
