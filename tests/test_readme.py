"""The README and the guide cannot rot: the README stays short, every relative link and anchor
leads somewhere, every campaign config they name loads, every `online-dpo` command in the
README's bash blocks names a real subcommand and real options (and its config loads with its
overrides), and every Python block compiles and imports what exists. No campaign runs: the
CLI is asked only for its --help, so the module takes a few seconds."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from online_dpo.config import load_config
from tests.conftest import ROOT

README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"
DOCS = [README, GUIDE]
MAX_README_LINES = 250
# The README's bash blocks hold about 19 real commands today; fewer checked than this means the
# parser stopped recognising them (or the README lost its examples), not that they are fine.
MIN_COMMANDS_CHECKED = 15
# A command holding one of these is a template for the reader to fill in, not one to check.
PLACEHOLDERS = ("...", "RUN_DIR", "$", "<", ">")

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\n(?P<body>.*?)^(?P=indent)```", re.MULTILINE | re.DOTALL)


def blocks(path: Path, lang: str) -> list[str]:
    """The fenced code blocks of `path` in language `lang`, dedented (a block may sit in a list item)."""
    out = []
    for m in FENCE.finditer(path.read_text()):
        if m.group("lang") == lang:
            indent = len(m.group("indent"))
            out.append("\n".join(line[indent:] for line in m.group("body").splitlines()))
    return out


def prose(path: Path) -> str:
    """`path` without its fenced blocks (a `# comment` in a bash block is no heading)."""
    return FENCE.sub("", path.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path).splitlines():
        if m := re.match(r"#{1,6} +(.*)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def relative_links(path: Path) -> list[str]:
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", prose(path))
    return [link for link in links if not re.match(r"[a-z]+:", link)]  # http:, https:, mailto:


def test_the_readme_is_short_enough_to_read_top_to_bottom():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail to docs/guide.md"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file_and_an_anchor_that_exist(doc):
    broken = []
    for link in relative_links(doc):
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(f"{link}: no {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link}: no heading with anchor #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{doc.name}: broken links:\n" + "\n".join(broken)


def named_configs() -> list[str]:
    return sorted({name for doc in DOCS for name in re.findall(r"configs/[\w.-]+\.yaml", doc.read_text())})


def test_the_docs_name_the_campaign_configs():
    assert "configs/quickstart.yaml" in named_configs()


@pytest.mark.parametrize("name", named_configs())
def test_every_campaign_config_the_docs_name_exists_and_loads(name):
    assert (ROOT / name).is_file(), f"{name} is named in the docs but does not exist"
    load_config(ROOT / name)


def test_every_accelerate_config_the_docs_name_exists():
    named = {n for doc in DOCS for n in re.findall(r"configs/accelerate/[\w.-]+\.yaml", doc.read_text())}
    assert named and not [n for n in named if not (ROOT / n).is_file()]


@cache
def cli_help(*args: str) -> str:
    """`online-dpo ARGS --help` (argparse prints it and exits before any work)."""
    done = subprocess.run([sys.executable, "-m", "online_dpo.cli", *args, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def subcommands() -> set[str]:
    listed = re.search(r"\{([\w,-]+)\}", cli_help())
    assert listed, cli_help()
    return set(listed.group(1).split(","))


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a bash block as argument lists: continuation lines joined, comments
    dropped, `a; b` and `a && b` split."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def online_dpo_args(command: list[str]) -> list[str] | None:
    """The arguments after `online-dpo` (or `-m online_dpo.cli`, as accelerate launches it); None
    for any other command."""
    for i, token in enumerate(command):
        if Path(token).name == "online-dpo":
            return command[i + 1:]
        if token == "online_dpo.cli" and i > 0 and command[i - 1] == "-m":
            return command[i + 1:]
    return None


def readme_commands() -> tuple[list[list[str]], list[list[str]]]:
    """The README's online-dpo commands: (to check, skipped as templates)."""
    checked, skipped = [], []
    for block in blocks(README, "bash"):
        for command in shell_commands(block):
            args = online_dpo_args(command)
            if args is not None:
                (skipped if any(p in a for a in args for p in PLACEHOLDERS) else checked).append(args)
    return checked, skipped


def test_the_readme_keeps_its_two_commands():
    first = blocks(README, "bash")[0]
    assert "make demo" in first and "make test" in first
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert {"demo", "test"} <= set(targets)


def command_problems(args: list[str], known: set[str]) -> list[str]:
    """What is wrong with `online-dpo ARGS`: an unknown subcommand or option, or (run, compare)
    a config that does not load with the command's overrides."""
    positional = [a for a in args if not a.startswith("-")]
    if not positional or positional[0] not in known:
        return [f"no such subcommand (known: {', '.join(sorted(known))})"]
    sub = positional[0]
    at = args.index(sub)
    problems = [f"online-dpo has no option {o}" for o in args[:at] if o not in cli_help()]
    for option in (a.split("=")[0] for a in args[at + 1:] if a.startswith("--")):
        if not re.search(rf"(^|[\s\[,]){re.escape(option)}\b", cli_help(sub)):
            problems.append(f"`{sub}` has no option {option}")
    if sub in ("run", "compare"):
        rest = args[at + 1:]
        config = next((a for a in rest if not a.startswith("-") and "=" not in a), None)
        overrides = [a for a in rest if "=" in a and not a.startswith("-")]
        try:
            load_config(ROOT / config if config else None, overrides)
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"the config does not load: {type(e).__name__}: {e}")
    return problems


def test_every_online_dpo_command_in_the_readme_parses_and_its_config_loads():
    checked, skipped = readme_commands()
    assert len(checked) >= MIN_COMMANDS_CHECKED, (
        f"only {len(checked)} online-dpo commands checked ({len(skipped)} skipped as templates: {skipped})")
    known = subcommands()
    broken = [f"online-dpo {' '.join(args)}: {problem}" for args in checked for problem in command_problems(args, known)]
    assert not broken, "README commands that would fail:\n" + "\n".join(broken)


def test_a_broken_command_is_caught():
    """The checker itself: an unknown subcommand, option and config key are each reported."""
    known = subcommands()
    assert command_problems(["inspekt", "runs/x"], known)
    assert command_problems(["report", "runs/x", "--wider"], known)
    assert command_problems(["run", "configs/quickstart.yaml", "dpo.betta=0.2"], known)
    assert not command_problems(["--debug", "run", "configs/quickstart.yaml", "dpo.beta=0.2"], known)


def test_the_cli_has_the_options_the_docs_promise():
    assert "--debug" in cli_help()
    assert "--wide" in cli_help("report")


def imported_names(tree: ast.AST) -> list[tuple[str, str | None]]:
    """(module, name) for every `import module` (name None) and `from module import name`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out += [(node.module, a.name) for a in node.names]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_python_block_compiles_and_imports_what_exists(doc):
    sources = blocks(doc, "python")
    assert sources, f"{doc.name} shows no Python"
    for i, source in enumerate(sources):
        where = f"{doc.name} python block {i + 1}"
        tree = compile(source, where, "exec", ast.PyCF_ONLY_AST)
        compile(tree, where, "exec")
        for module, name in imported_names(tree):
            imported = importlib.import_module(module)
            if name is not None and not hasattr(imported, name):
                try:
                    importlib.import_module(f"{module}.{name}")  # a submodule: `from pkg import mod`
                except ModuleNotFoundError:
                    pytest.fail(f"{where}: `from {module} import {name}`: {module} has no {name}")
