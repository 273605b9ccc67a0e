"""The README's commands are the ones CI and users run."""

import re

from conftest import REPO_ROOT


def fenced_commands(text: str, heading: str) -> str:
    section = text.split(heading, 1)[1]
    return re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    command = re.search(r"TEST_COMMAND='(.*)'", ci).group(1)
    assert fenced_commands(readme, "### Run the tests") == command
