"""What the pages claim stays true: no shipped feature called planned, no internal notes, every
command in the command-line guide, diagrams where they explain, no empty table headers."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import attrs

from t2i_core import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: Words that say a feature is not there yet.
FUTURE = re.compile(
    r"\b(planned|will be added|coming soon|not yet (?:supported|available|implemented)|loading yet)\b", re.I
)
#: Phrases of notes written for the people building t2i, not for its users.
INTERNAL = re.compile(
    r"from the issue|the issue's|issue #\d+|pending a GPU|GPU session|red team|\.whl/|ci-venv|closing notes",
    re.I,
)


def _pages() -> list[Path]:
    """README.md and the docs pages (generated ones too; not the example plugin's build leftovers)."""
    found = [
        p for p in DOCS.rglob("*.md") if not any(part.startswith(".") or part.endswith(".egg-info") for part in p.parts)
    ]
    return [ROOT / "README.md", *sorted(found)]


def _shipped_features() -> set[str]:
    """What t2i does: the request's fields, and the words users know them by."""
    fields = {field.name for field in attrs.fields(GenerationRequest)}
    return fields | {
        "LoRA",
        "textual-inversion",
        "textual inversion",
        "ControlNet",
        "IP-Adapter",
        "Compel",
        "hires fix",
    }


def test_no_page_calls_a_shipped_feature_planned() -> None:
    features = _shipped_features()
    for page in _pages():
        if page.name == "changelog.md":
            continue  # the history says what was planned once, and when it came
        text = " ".join(page.read_text(encoding="utf-8").split())
        for sentence in re.split(r"(?<=[.!?])\s", text):
            if not FUTURE.search(sentence):
                continue
            named = {f for f in features if re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", sentence)}
            named = {f for f in named if f"`{f}`" in sentence or not f.islower()}  # a field is named in code
            assert not named, f"{page.relative_to(ROOT)} says {sorted(named)} are to come: {sentence[:200]!r}"


def test_the_guard_sees_a_stale_claim(tmp_path: Path) -> None:
    sentence = "No LoRA loading yet (the request's `loras` are planned)."
    assert FUTURE.search(sentence)
    assert {f for f in _shipped_features() if f in sentence} >= {"LoRA", "loras"}


def test_no_internal_notes_in_user_pages() -> None:
    for page in _pages():
        if page.name == "changelog.md":
            continue  # the history may name what it was about
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            found = INTERNAL.search(line)
            assert found is None, (
                f"{page.relative_to(ROOT)}:{number}: an internal note ({found[0]!r}): {line.strip()[:160]}"
            )


def test_no_table_opens_with_an_empty_header() -> None:
    for page in _pages():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            cells = line.strip().strip("|").split("|") if line.lstrip().startswith("|") else []
            empty = bool(cells) and all(not cell.strip() for cell in cells)
            assert not empty, f"{page.relative_to(ROOT)}:{number}: a table header with no words; name its columns"


def test_the_command_line_guide_names_every_command_and_registration_kind() -> None:
    from t2i_core import get_registry
    from t2i_core.cli import main
    from t2i_core.cli.main import build_parser

    guide = (DOCS / "cli.md").read_text(encoding="utf-8")
    synopsis = guide.split("```text", 1)[1].split("```", 1)[0]
    parser = build_parser(get_registry().first_party("command"))
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        names = [f"{name} {sub}" for a in nested for sub in a.choices] or [name]
        for full in names:
            assert f"t2i {full} " in synopsis, f"docs/cli.md's command summary lacks `t2i {full}`"
            assert f"## `t2i {full}`" in guide, f"docs/cli.md has no section on `t2i {full}`"
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert main(["plugins"]) == 0
    kinds = set(re.findall(r"^  ([a-z]+):\S", output.getvalue(), re.M))
    assert {"provider", "accelerator", "executor", "command"} <= kinds
    section = guide.split("## `t2i plugins`", 1)[1].split("\n## ", 1)[0]
    for kind in kinds:
        assert f"`{kind}:`" in section, f"docs/cli.md's `t2i plugins` section does not name what {kind}: lines are"


def test_pictures_where_people_look_for_them() -> None:
    """A Mermaid diagram on each page that explains a flow; mkdocs renders the fence, the docs test shows it."""
    for page in ("architecture.md", "concepts.md", "serving.md", "batch.md"):
        assert "```mermaid\n" in (DOCS / page).read_text(encoding="utf-8"), f"docs/{page} has no diagram"
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "name: mermaid" in config and "pymdownx.superfences.fence_code_format" in config
    assert "- admonition" in config and "- pymdownx.details" in config
    # The server's page, as its headless-Chromium test leaves it (T2I_DOCS_SCREENSHOT refreshes it).
    from PIL import Image

    assert "](images/serve-page.png)" in (DOCS / "serving.md").read_text(encoding="utf-8")
    with Image.open(DOCS / "images" / "serve-page.png") as screenshot:
        assert screenshot.format == "PNG" and screenshot.size[0] >= 1000
    assert "T2I_DOCS_SCREENSHOT" in (ROOT / "plugins" / "server" / "tests" / "test_server_page.py").read_text()
    import test_doc_examples

    block = test_doc_examples.Block(DOCS / "concepts.md", 1, "mermaid", "flowchart LR\n  a --> b\n", None)
    test_doc_examples.Page(DOCS / "concepts.md", ROOT, lambda family: family).run(block)  # shown, not run
