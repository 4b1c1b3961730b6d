"""Every tool's --help: it builds, describes every flag, and a tool that draws a progress bar can be told not to
(--no-progress, as tools/evaluate.py and tools/extract_concepts.py spell it)."""

import importlib
import os

import pytest

from tests.helpers.paths import ROOT

TOOLS = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "tools"))
               if name.endswith(".py") and name != "__init__.py")


@pytest.mark.parametrize("name", TOOLS)
def test_help_describes_every_flag(name):
    tool = importlib.import_module(f"tools.{name}")
    parser = tool.build_parser()
    text = parser.format_help()
    assert parser.description and parser.description.split()[0] in text
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help.strip(), f"tools/{name}.py: {action.option_strings} has no help"
            assert action.option_strings[0] in text
    with open(os.path.join(ROOT, "tools", f"{name}.py")) as f:
        draws_bars = "tqdm" in f.read()
    if draws_bars:
        assert "--no-progress" in {s for a in parser._actions for s in a.option_strings}, (
            f"tools/{name}.py draws a tqdm bar but has no --no-progress")
