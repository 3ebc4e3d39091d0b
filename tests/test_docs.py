"""The README is a front page and the manual under docs/ is complete: its API page names every public name,
and every relative link of the README and the docs leads to a file that exists. (`make docs` builds the site
with --strict, which also fails on a broken link inside docs/.)"""

import re
from pathlib import Path

import resnet_surgery as rs

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").glob("*/README.md"))]


def test_the_readme_is_a_front_page():
    size = len((REPO / "README.md").read_bytes())
    assert size <= 15_000, f"README.md is {size} bytes: move the detail to a page under docs/"


def test_the_api_page_lists_every_public_name():
    listed = set(re.findall(r"^::: resnet_surgery\.[\w.]+\.(\w+)$", (REPO / "docs" / "api.md").read_text(), re.M))
    assert listed == set(rs.__all__), (sorted(set(rs.__all__) - listed), sorted(listed - set(rs.__all__)))


def test_every_relative_link_leads_to_a_file():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _blocks(kind: str):
    """(page, code) of every fenced block of ``kind`` ("bash" or "python") in the README, docs and examples."""
    return [(page.relative_to(REPO), code) for page in PAGES for lang, code in FENCE.findall(page.read_text())
            if lang == kind]


def test_every_command_in_the_docs_names_a_command_and_options_it_has():
    """A renamed command or option breaks the page here (the commands themselves need real weights and data)."""
    import shlex

    import click

    from resnet_surgery.cli import main

    wrong, seen = [], 0
    for page, code in _blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("  #")[0].strip(), comments=True)
            if not words or words[0] != "resnet-surgery" or len(words) < 2 or words[1].startswith("-"):
                continue
            seen += 1
            command = main.commands.get(words[1])
            if command is None:
                wrong.append(f"{page}: no command {words[1]!r}")
                continue
            names = {o for p in command.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
            wrong += [f"{page}: {words[1]} has no option {w}" for w in words[2:]
                      if w.startswith("--") and w.split("=")[0] not in names | {"--help"}]
    assert seen >= 20 and not wrong, (seen, wrong)


def test_every_python_call_in_the_docs_names_a_public_function_and_arguments_it_takes():
    """``rs.NAME(..., keyword=...)`` in a page: NAME is public and takes that keyword (a parameter, or a field of
    its options object where it takes fields as keywords)."""
    import ast
    import dataclasses
    import inspect

    wrong, seen = [], 0
    for page, code in _blocks("python"):
        try:
            tree = ast.parse(code)
        except SyntaxError as e:
            wrong.append(f"{page}: not Python ({e.msg}, line {e.lineno})")
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "rs"):
                continue
            seen += 1
            name = node.func.attr
            if name not in rs.__all__:
                wrong.append(f"{page}: rs.{name} is not public")
                continue
            target = getattr(rs, name)
            if dataclasses.is_dataclass(target):
                takes = {f.name for f in dataclasses.fields(target)}
            else:
                parameters = inspect.signature(target).parameters
                takes = set(parameters)
                options = parameters.get("options")
                if options is not None and any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
                    cls = getattr(rs, str(options.annotation).split(" |")[0])
                    takes |= {f.name for f in dataclasses.fields(cls)}
            wrong += [f"{page}: rs.{name} takes no {k.arg}=" for k in node.keywords
                      if k.arg is not None and k.arg not in takes]
    assert seen >= 10 and not wrong, (seen, wrong)
