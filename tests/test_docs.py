"""The README and docs/ hold together: every relative link reaches a file (and a heading, for #anchors into
Markdown), the README stays short and names the two commands, and every benchmark block in docs/ has the bench
script that writes it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Pages other branches of this round add (GPU/Jetson, serving, security, reliability, CLI, cascade): links to them
# are allowed before they exist; once they exist they are checked like any page.
COMING = {"gpu.md", "serving.md", "security.md", "reliability.md", "cli.md", "cascade.md"}
# the README's benchmark blocks before they moved into docs/ (each still rewritten by its script)
MOVED = {"memory", "heads", "zero_shot_heads", "latent_demo", "classify", "adaptive", "export_sd", "precision",
         "match_presets", "match", "diffdis", "finetune", "scale", "parity"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def prose(page: Path) -> str:
    """The page without code blocks and code spans (a `[x](y)` there is not a link)."""
    return CODE.sub("", FENCE.sub("", page.read_text()))


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1, -2 ... on repeats."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            if not (file.parent == REPO / "docs" and file.name in COMING):
                broken.append(f"{target}: no file {file.relative_to(REPO) if file.is_relative_to(REPO) else file}")
        elif anchor and file.suffix == ".md" and anchor not in set(anchors(file)):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_links_are_found_at_all():
    """The link pattern sees the README's links, anchors included (guards the test above against matching nothing)."""
    found = links(REPO / "README.md")
    assert "docs/install.md" in found and "docs/own-model.md#what-it-costs" in found


def test_anchor_slugs_follow_github():
    page = REPO / "docs" / "methods.md"
    assert "fine-tuning-for-matching-unidiff-style-itc--is--rsc" in set(anchors(page))  # '+' dropped, spaces kept
    assert "imagetext-matching-dsd-and-prompt-learning" in set(anchors(page))  # the en dash dropped


def test_readme_is_short_and_names_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    assert "<!-- bench:" not in readme  # the bench tables live in docs/


def test_every_benchmark_block_has_its_script():
    """A `<!-- bench:NAME -->` block is rewritten by the bench script that publishes NAME (bench/common.py)."""
    scripts = {p: p.read_text() for p in (REPO / "bench").glob("*.py")}
    blocks = {name: page for page in PAGES for name in re.findall(r"<!-- bench:(\w+) -->", prose(page))}
    assert MOVED <= set(blocks), f"benchmark blocks missing from docs/: {sorted(MOVED - set(blocks))}"
    orphans = [f"{name} ({page.name})" for name, page in blocks.items()
               if not any(f'"{name}"' in text for path, text in scripts.items() if path.name != "common.py")]
    assert not orphans, f"no bench script publishes {orphans}"
    for name, page in blocks.items():
        assert page.read_text().count(f"<!-- /bench:{name} -->") == 1, f"{page.name}: {name} not closed once"


def test_architecture_names_only_files_that_exist():
    """docs/architecture.md traces a call through the code: every file path it names (`dir/file.py`, `dir/`) exists,
    and every `function` it pins to a file is defined there."""
    page = (REPO / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`((?:app|engine|kernels|reference|export|calibration|tests)/[\w/.]*)`", page))
    assert len(paths) > 20, paths
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
    pinned = re.findall(r"`((?:app|engine|kernels|export)/[\w/]+\.py)` `(\w+)`", page)
    assert len(pinned) > 5, pinned
    absent = [(f, name) for f, name in pinned if not re.search(rf"^\s*(?:def|class) {name}\b|^{name} = ",
                                                             (REPO / f).read_text(), re.M)]
    assert not absent, f"docs/architecture.md pins names their files do not define: {absent}"
