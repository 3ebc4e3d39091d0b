"""The README is a front page and the manual under docs/ is complete: its API page names every public name,
and every relative link of the README and the docs leads to a file that exists. (`make docs` builds the site
with --strict, which also fails on a broken link inside docs/.)"""

import re
from pathlib import Path

import resnet_surgery as rs

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_a_front_page():
    size = len((REPO / "README.md").read_bytes())
    assert size <= 15_000, f"README.md is {size} bytes: move the detail to a page under docs/"


def test_the_api_page_lists_every_public_name():
    listed = set(re.findall(r"^::: resnet_surgery\.[\w.]+\.(\w+)$", (REPO / "docs" / "api.md").read_text(), re.M))
    assert listed == set(rs.__all__), (sorted(set(rs.__all__) - listed), sorted(listed - set(rs.__all__)))


def test_every_relative_link_leads_to_a_file():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").glob("*/README.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken
