"""The README's first two commands are the documented entry points; CI must run the second."""
import re

from conftest import ROOT


def readme_commands():
    text = open(f"{ROOT}/README.md").read()
    return re.findall(r"```(?:sh|bash)\n(.*?)\n```", text, re.S)


def test_readme_opens_with_build_and_test_commands():
    build, test = readme_commands()[:2]
    assert "vitdsl build specs/" in build and "pip install" in build
    assert "pytest" in test and "pip install" in test


def test_ci_runs_the_readme_test_command():
    test = readme_commands()[1].strip()
    assert test in open(f"{ROOT}/.ci/run").read()
