"""The README's "Using it" block: every command in it exists and parses (fast, in the suite);
`scripts/check_readme.py` (`make readme`) runs it all, as written, in a fresh clone."""
import glob
import importlib.util
import os
import shlex

import click
import typer

from haagenti.cli import app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_lines() -> list[str]:
    spec = importlib.util.spec_from_file_location("check_readme", os.path.join(REPO, "scripts", "check_readme.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open(os.path.join(REPO, "README.md")) as f:
        return mod.using_it_block(f.read())


def test_every_using_it_command_parses():
    root = typer.main.get_command(app)
    commands = []
    for line in readme_lines():
        for part in line.split("#", 1)[0].split("&&"):
            words = shlex.split(part)
            assert words and words[0] == "haagenti", line
            commands.append(words[1:])
    assert len(commands) >= 12
    for words in commands:
        words = [w for w in words if not glob.has_magic(w)] or words  # a glob stands for files
        ctx = root.make_context("haagenti", list(words), resilient_parsing=False)
        sub = ctx
        while isinstance(sub.command, click.Group) and sub.protected_args + sub.args:
            name, *rest = sub.protected_args + sub.args
            cmd = sub.command.get_command(sub, name)
            assert cmd is not None, f"no command {name!r} in {words}"
            sub = cmd.make_context(name, rest, parent=sub)
