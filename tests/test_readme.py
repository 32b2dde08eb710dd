"""CI runs the README's two commands exactly as printed: this fails when they drift apart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    quick_start = ROOT.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick_start, re.S)]


def test_ci_runs_the_readmes_two_commands_verbatim_and_in_order():
    commands = _readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    main, tests = commands
    assert main.endswith("workflows/full_cv.py") and tests.endswith("-m pytest")
    ci = ROOT.joinpath(".ci", "run").read_text().splitlines()
    assert main in ci and tests in ci, "a README command is not a line of .ci/run, as printed"
    assert ci.index(main) < ci.index(tests)
    # what CI checks after the main command runs on the output the README's command writes
    assert any(line.startswith(".venv/bin/python .ci/check_first_run.py runs/embedded") for line in ci)


def test_one_torch_pin_in_the_readme_pyproject_and_cluster_yaml():
    pins = {
        "README": set(re.findall(r"torch==([\w.]+)", ROOT.joinpath("README.md").read_text())),
        "pyproject.toml": set(re.findall(r'"torch==([\w.]+)"', ROOT.joinpath("pyproject.toml").read_text())),
        "cluster.yaml": set(re.findall(r"torch==([\w.]+)", ROOT.joinpath("cluster.yaml").read_text())),
        ".ci/run": set(re.findall(r"torch==([\w.]+)", ROOT.joinpath(".ci", "run").read_text())),
    }
    assert all(len(found) == 1 for found in pins.values()) and len(set.union(*pins.values())) == 1, pins
