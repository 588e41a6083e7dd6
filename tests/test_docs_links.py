"""The README and the guide pages under docs/: every relative link resolves, the README stays short.

A link ``[text](target)`` with a relative target (``#anchor``, ``docs/recipes.md#anchor``, ``../README.md``,
``BENCHMARKS.md#fidelity``) must name an existing file and, when it has an anchor, a heading of that file
under GitHub's slug rule (see ``github_slug``). Links to web pages (``https://…``) are not fetched.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 300
GUIDES = ("recipes", "large-models", "formats", "architecture", "troubleshooting", "development")

LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: text only (links and emphasis markers dropped, code kept as its text),
    lower case, every character that is not a letter, digit, space, hyphen or underscore removed, each space
    a hyphen (runs of hyphens are kept, as GitHub keeps them)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in ``path``; a repeated slug gets -1, -2, … as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link outside code (fenced blocks and inline code)."""
    links = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            target = m.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                links.append((n, target))
    return links


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link of ``path`` whose file or heading does not exist (paths shown from ``root``)."""
    problems = []
    for n, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{n}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no file {file_part}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Supported models", "supported-models"),
        ("Checking fidelity: `llavaq verify`", "checking-fidelity-llavaq-verify"),
        ("One command to the best model: `quantize --recipe auto`",
         "one-command-to-the-best-model-quantize---recipe-auto"),
        ("m2 search: `--m2_search full|fast|exhaustive`", "m2-search---m2_search-fullfastexhaustive"),
        ("Large models (7B / 13B) on a small machine", "large-models-7b--13b-on-a-small-machine"),
        ("Fidelity with rotation (`--rotation hadamard`)", "fidelity-with-rotation---rotation-hadamard"),
        ("Evaluation ≠ calibration", "evaluation--calibration"),
        ("See [the guide](docs/x.md) now", "see-the-guide-now"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_repeated_headings_are_numbered(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# A\n## Notes\n```\n# Notes\n```\n### Notes\n", encoding="utf-8")
    assert anchors(page) == {"a", "notes", "notes-1"}


def test_a_missing_anchor_or_file_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "# Title\n[ok](#title) [bad](#nope) [gone](other.md) `[code](#ignored)`\n"
        "```\n[fenced](#ignored-too)\n```\n[web](https://example.com/#x)\n",
        encoding="utf-8",
    )
    assert broken_links(page, tmp_path) == [
        "p.md:2: #nope: no heading #nope in p.md",
        "p.md:2: other.md: no file other.md",
    ]


def test_guides_exist_and_the_readme_links_each() -> None:
    readme_targets = {t.partition("#")[0] for _, t in relative_links(README)}
    for name in GUIDES:
        assert (ROOT / "docs" / f"{name}.md").is_file(), name
        assert f"docs/{name}.md" in readme_targets, f"README.md does not link docs/{name}.md"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_readme_is_at_most_300_lines() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}; move detail to docs/)"
