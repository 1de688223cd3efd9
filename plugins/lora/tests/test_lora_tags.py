"""``<lora:NAME:WEIGHT>`` tags and embedding folders: the same images as the explicit `Lora` and `Embedding`.

A prompt with ``<lora:style:0.8>`` and ``Engine.lora_dirs`` must give exactly the image of the
prompt without the tag plus ``Lora(file, 0.8)`` (which `test_lora.py` checks against raw
diffusers), through the SDK and the CLI; a word naming a file of ``Engine.embedding_dirs`` exactly
the image of ``Embedding(file, token=word)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support import tiny_folder

from t2i_core import Embedding, GenerationRequest, InvalidRequestError, Lora, clear_cache, expand_prompt, load
from t2i_core.cli import main
from t2i_core.prompt_tags import lora_tags
from t2i_core.testing import as_array, assert_images_equal

pytest.importorskip("t2i_lora")
from t2i_lora import tiny

STEPS = 2
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")


@pytest.fixture(scope="module", autouse=True)
def own_weights() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoRA folder (``style``, ``ink``, ``sub/deep``) and an embedding folder (``grainy``, ``unused``) for tiny:sd15."""
    root = tmp_path_factory.mktemp("tags")
    folder = tiny_folder("sd15")
    loras, embeddings = root / "loras", root / "embeddings"
    tiny.lora_file(folder, loras / "style.safetensors", seed=1, text_encoders=True)
    tiny.lora_file(folder, loras / "ink.safetensors", seed=2)
    tiny.lora_file(folder, loras / "sub" / "deep.safetensors", seed=3)
    tiny.embedding_file(folder, embeddings / "grainy.safetensors", token="<x>", vectors=2, seed=6)
    tiny.embedding_file(folder, embeddings / "unused.safetensors", token="<y>", seed=7)
    (embeddings / "notes.txt").write_text("not an embedding")
    return {"loras": loras, "embeddings": embeddings}


@pytest.fixture(scope="module")
def engine(folders: dict[str, Path]) -> Any:
    engine = load("tiny:sd15", device="cpu")
    engine.lora_dirs = (str(folders["loras"]),)
    engine.embedding_dirs = (str(folders["embeddings"]),)
    return engine


def request(**fields: Any) -> GenerationRequest:
    fields.setdefault("num_inference_steps", STEPS)
    fields.setdefault("seed", 5)
    return GenerationRequest(**fields)


# -- reading the tags -------------------------------------------------------------------------


def test_tags_are_removed_exactly_and_read_in_order() -> None:
    text, tags = lora_tags("a cat <lora:style:0.8>, <lyco:sub/deep> and <other:thing>")
    assert text == "a cat ,  and <other:thing>"  # as A1111 removes them; other kinds stay text
    assert [(tag.name, tag.weight, tag.text) for tag in tags] == [
        ("style", 0.8, "<lora:style:0.8>"),
        ("sub/deep", 1.0, "<lyco:sub/deep>"),
    ]
    assert lora_tags("no tags (red:1.2)") == ("no tags (red:1.2)", ())


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a <lora:style:0.5:0.7>", "one weight"),
        ("a <lora:style:te=0.5>", "one weight"),
        ("a <lora:style:heavy>", r"weight in \[-10, 10\]"),
        ("a <lora:style:11>", r"weight in \[-10, 10\]"),
        ("a <hypernet:anime:1>", "hypernetworks are not supported"),
    ],
)
def test_tags_t2i_cannot_apply_are_refused(prompt: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as caught:
        expand_prompt(request(prompt=prompt), lora_dirs=("unused",))
    assert caught.value.field == "prompt"


def test_names_are_looked_up_in_the_folders(folders: dict[str, Path], tmp_path: Path) -> None:
    dirs = (str(tmp_path), str(folders["loras"]))  # an empty folder first: the next one has them
    deep = str(folders["loras"] / "sub" / "deep.safetensors")
    for written in ("<lora:sub/deep:0.5>", "<lora:deep:0.5>"):  # a path inside the folder, or a sub-folder's stem
        expanded = expand_prompt(request(prompt=f"a {written} cat", loras=(Lora("x.safetensors"),)), lora_dirs=dirs)
        assert (expanded.prompt, expanded.loras) == ("a  cat", (Lora("x.safetensors"), Lora(deep, 0.5)))
    with pytest.raises(InvalidRequestError, match="each LoRA once"):
        expand_prompt(request(prompt="a <lora:sub/deep> <lora:deep:0.3>"), lora_dirs=dirs)
    plain = request(prompt="a cat, no tags")
    assert expand_prompt(plain, lora_dirs=dirs) is plain
    (tmp_path / "loop").symlink_to(tmp_path)  # a linked folder that leads back: walked once
    assert expand_prompt(request(prompt="a <lora:deep>"), lora_dirs=dirs).loras == (Lora(deep),)
    one = expand_prompt(request(prompt="a <lora:deep>"), lora_dirs=str(folders["loras"]))  # type: ignore[arg-type]
    assert one.loras == (Lora(deep),)  # a folder given alone, not as a sequence


@pytest.mark.parametrize("name", ["stlye", "../loras/style", "/etc/style", "sub\\deep", "sub/../style"])
def test_an_unknown_or_outside_name_is_refused_naming_it(folders: dict[str, Path], name: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        expand_prompt(request(prompt=f"a <lora:{name}:0.8>"), lora_dirs=(str(folders["loras"]),))
    assert caught.value.field == "prompt" and caught.value.value == f"<lora:{name}:0.8>"
    if name == "stlye":  # the closest names first, never the folder's path
        assert "one of style, " in str(caught.value) and str(folders["loras"]) not in str(caught.value)


def test_a_tag_without_folders_or_text_is_refused(folders: dict[str, Path]) -> None:
    with pytest.raises(InvalidRequestError, match="--lora-dir DIR or \\$T2I_LORA_DIR"):
        expand_prompt(request(prompt="a <lora:style>"))
    with pytest.raises(InvalidRequestError, match="text besides its <lora:...> tags"):
        expand_prompt(request(prompt="<lora:style>"), lora_dirs=(str(folders["loras"]),))
    with pytest.raises(InvalidRequestError, match="lora_dirs='nowhere'"):
        expand_prompt(request(prompt="a <lora:style>"), lora_dirs=("nowhere",))
    (folders["loras"].parent / "pickled").mkdir(exist_ok=True)
    (folders["loras"].parent / "pickled" / "old.pt").write_bytes(b"")
    with pytest.raises(InvalidRequestError, match="old.pt is a pickle"):
        expand_prompt(request(prompt="a <lora:old>"), lora_dirs=(str(folders["loras"].parent / "pickled"),))


def test_folders_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, folders: dict[str, Path]) -> None:
    monkeypatch.setenv("T2I_LORA_DIR", os.pathsep.join(["", str(folders["loras"])]))
    monkeypatch.setenv("T2I_EMBEDDINGS_DIR", str(folders["embeddings"]))
    engine = load("tiny:sd15", device="cpu")
    assert engine.lora_dirs == (str(folders["loras"]),)
    assert engine.embedding_dirs == (str(folders["embeddings"]),)


# -- the images ---------------------------------------------------------------------------------


def test_a_tag_gives_the_image_of_its_lora(engine: Any, folders: dict[str, Path]) -> None:
    style = str(folders["loras"] / "style.safetensors")
    tagged = engine.generate(request(prompt="a lighthouse <lora:style:0.8>, at dusk"))
    explicit = engine.generate(request(prompt="a lighthouse , at dusk", loras=(Lora(style, 0.8),)))
    assert_images_equal(tagged.images, explicit.images)
    plain = engine.generate(request(prompt="a lighthouse , at dusk"))
    assert not np.array_equal(as_array(tagged.images[0]), as_array(plain.images[0]))
    # The result keeps the prompt as written; the tag's LoRA is reported apart.
    assert tagged.request.prompt == "a lighthouse <lora:style:0.8>, at dusk" and tagged.request.loras == ()
    assert tagged.prompt_loras == (Lora(style, 0.8),)
    assert engine.resolve(request(prompt="a lighthouse <lora:style:0.8>, at dusk"))[0] == tagged.request
    again = engine.generate(tagged.request)
    assert_images_equal(again.images, tagged.images)
    data = tagged.metadata()
    assert data["prompt"] == "a lighthouse <lora:style:0.8>, at dusk" and "loras" not in data
    assert [entry["name"] for entry in json.loads(data["prompt_loras"])] == ["style.safetensors"]
    assert str(folders["loras"]) not in json.dumps(data)


def test_tags_add_to_the_requests_own_loras_and_work_with_a1111_emphasis(engine: Any, folders: dict[str, Path]) -> None:
    pytest.importorskip("t2i_compel")
    style, ink = (str(folders["loras"] / f"{name}.safetensors") for name in ("style", "ink"))
    # A prompt whose emphasis stays finite on the tiny model (docs/conditioners/a1111.md).
    fields = {"prompt_weighting": "a1111", "negative_prompt": "(deformed:1.2), lowres"}
    prompt = "a (red:1.3) cat, [blurry] ((sunny)) background"
    tagged = engine.generate(request(prompt=f"{prompt} <lora:ink:0.6>", loras=(Lora(style, 0.5),), **fields))
    explicit = engine.generate(request(prompt=f"{prompt} ", loras=(Lora(style, 0.5), Lora(ink, 0.6)), **fields))
    assert_images_equal(tagged.images, explicit.images)
    assert len(set(tagged.images[0].getdata())) > 1  # not a flat (overflowed) image
    assert tagged.request.loras == (Lora(style, 0.5),) and tagged.prompt_loras == (Lora(ink, 0.6),)


def test_an_embedding_folder_word_gives_the_image_of_its_embedding(engine: Any, folders: dict[str, Path]) -> None:
    grainy = str(folders["embeddings"] / "grainy.safetensors")
    fields = {"prompt": "a grainy photo of a fox", "negative_prompt": "grainy, blurry"}
    by_word = engine.generate(request(**fields))
    explicit = engine.generate(request(embeddings=(Embedding(grainy, token="grainy"),), **fields))
    assert_images_equal(by_word.images, explicit.images)
    assert by_word.prompt_embeddings == (Embedding(grainy, token="grainy"),)  # not unused.safetensors
    assert by_word.request.embeddings == ()
    # Without the folder, "grainy" is a plain word.
    engine_without = load("tiny:sd15", device="cpu", cache=False)  # the cached weights know the token now
    plain = engine_without.generate(request(**fields))
    assert not np.array_equal(as_array(plain.images[0]), as_array(by_word.images[0]))
    # Only whole words: "grainyness" names no file.
    assert expand_prompt(request(prompt="grainyness"), embedding_dirs=(str(folders["embeddings"]),)).embeddings == ()


# -- the command line ---------------------------------------------------------------------------


def test_cli_lora_dir_gives_the_sdk_image_and_from_reads_the_tags_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: Any, folders: dict[str, Path]
) -> None:
    common = ["--model", "tiny:sd15", "--steps", str(STEPS), "--device", "cpu", "--seed", "5"]
    dirs = ["--lora-dir", str(folders["loras"]), "--embeddings-dir", str(folders["embeddings"])]
    first = tmp_path / "first.png"
    prompt = "a grainy lighthouse <lora:style:0.8>"
    assert main(["generate", prompt, *common, *dirs, "-o", str(first)]) == 0, capsys.readouterr().err
    sdk = engine.generate(request(prompt=prompt))
    with Image.open(first) as image:
        assert_images_equal([image.convert("RGB")], sdk.images)
        assert image.text["prompt"] == prompt  # type: ignore[attr-defined]
    # --from reads the tags again (each LoRA once: the PNG's prompt_loras are not --lora files).
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(first), *dirs, "-o", str(again)]) == 0, capsys.readouterr().err
    with Image.open(first) as a, Image.open(again) as b:
        assert_images_equal([a.convert("RGB")], [b.convert("RGB")])
    capsys.readouterr()
    assert main(["generate", "--from", str(first), "-o", str(tmp_path / "x.png")]) == 2
    assert "--lora-dir" in capsys.readouterr().err
    # A folder whose style.safetensors is another file: refused, naming the file the image was made with.
    tiny.lora_file(tiny_folder("sd15"), tmp_path / "other" / "style.safetensors", seed=9)
    other = ["--lora-dir", str(tmp_path / "other"), "--embeddings-dir", str(folders["embeddings"])]
    assert main(["generate", "--from", str(first), *other, "-o", str(tmp_path / "y.png")]) == 2
    assert "style.safetensors (sha256 " in capsys.readouterr().err


def test_cli_unknown_name_and_missing_folder_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folders: dict[str, Path]
) -> None:
    common = ["--model", "tiny:sd15", "--steps", str(STEPS), "--device", "cpu", "-o", str(tmp_path / "x.png")]
    assert main(["generate", "a <lora:stlye:0.8>", "--lora-dir", str(folders["loras"]), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'<lora:stlye:0.8>'" in err and "style" in err
    assert main(["generate", "a cat", "--lora-dir", str(tmp_path / "nowhere"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--lora-dir" in err


def test_a_hires_prompt_repeats_the_prompts_tags(engine: Any, folders: dict[str, Path]) -> None:
    from t2i_core import HiresFix

    dirs = (str(folders["loras"]),)
    hires = HiresFix(scale=1.5, strength=0.5, prompt="a sharp lighthouse <lora:style:0.8>")
    expanded = expand_prompt(request(prompt="a lighthouse <lora:style:0.8>", hires=hires), lora_dirs=dirs)
    assert expanded.hires is not None and expanded.hires.prompt == "a sharp lighthouse "
    for other in ("a sharp lighthouse", "a sharp lighthouse <lora:style:0.5>", "a <lora:ink>"):
        with pytest.raises(InvalidRequestError) as caught:
            expand_prompt(request(prompt="a lighthouse <lora:style:0.8>", hires=HiresFix(prompt=other)), lora_dirs=dirs)
        assert caught.value.field == "hires.prompt"
    tagged = engine.generate(request(prompt="a lighthouse <lora:style:0.8>", hires=hires, height=32, width=32))
    explicit = request(prompt="a lighthouse ", hires=expanded.hires, height=32, width=32, loras=expanded.loras)
    assert_images_equal(tagged.images, engine.generate(explicit).images)
    assert tagged.request.hires == hires  # as written


def test_batch_jobs_read_the_folders_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: Any, folders: dict[str, Path]
) -> None:
    monkeypatch.setenv("T2I_LORA_DIR", str(folders["loras"]))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "tagged", "prompt": "a lighthouse <lora:style:0.8>", "seed": 5}) + "\n")
    out = tmp_path / "out"
    argv = ["batch", str(jobs), "--model", "tiny:sd15", "--out", str(out), "--steps", str(STEPS), "--device", "cpu"]
    assert main(argv) == 0
    with Image.open(out / "tagged.png") as image:
        assert_images_equal(
            [image.convert("RGB")], engine.generate(request(prompt="a lighthouse <lora:style:0.8>")).images
        )
        assert image.text["prompt"] == "a lighthouse <lora:style:0.8>"  # type: ignore[attr-defined]
