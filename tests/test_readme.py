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


def _project_pin() -> str:
    return re.search(r'"torch==([\w.]+)"', ROOT.joinpath("pyproject.toml").read_text()).group(1)


def test_the_cpu_install_line_pins_the_project_torch_into_the_venv_the_commands_use():
    quick_start = ROOT.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    cpu = [line.strip() for line in quick_start.splitlines() if "download.pytorch.org/whl/cpu" in line]
    assert len(cpu) == 1, cpu
    assert cpu[0] == (f"python3 -m venv .venv && .venv/bin/pip install torch=={_project_pin()} "
                      "--index-url https://download.pytorch.org/whl/cpu"), cpu[0]
    # CI runs the two commands where only the package registries are reachable: no other index there
    assert not any("index-url" in c or "download.pytorch.org" in c for c in _readme_commands())
    # ...and both install the plain pin, which the CPU wheel (2.13.0+cpu) already satisfies
    assert all(f"install -q torch=={_project_pin()} " in c.replace("install torch", "install -q torch")
               for c in _readme_commands())


def test_the_readme_installs_torch_on_a_gpu_machine_as_cluster_yaml_does():
    cluster = ROOT.joinpath("cluster.yaml").read_text()
    installs = [line for line in cluster.splitlines() if re.search(r"pip install .*torch==", line)]
    assert len(installs) == 1 and "index-url" not in installs[0], installs  # PyPI's build: CUDA 12
    assert installs[0].split("pip install", 1)[1].split("#")[0].split() == ["-q", f'"torch=={_project_pin()}"']
    readme = ROOT.joinpath("README.md").read_text()
    assert f'cluster.yaml`\'s nodes do (`pip install "torch=={_project_pin()}"`' in readme
