"""Every setting declared once (boneage.config): the docs, the flags and their help, the README's numbers
and the error messages all follow the models, and a bad value is one line, never a traceback."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from boneage import cli
from boneage.config import (CVConfig, Config, check, default_of, load_config, settings, settings_markdown,
                            show_value, type_name)
from boneage.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _boneage(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "boneage.cli", *argv], capture_output=True, text=True, cwd=cwd)


def test_docs_settings_md_is_the_generated_table():
    documented = ROOT.joinpath("docs", "settings.md").read_text()
    assert documented == settings_markdown(cli.SETTING_FLAGS), \
        "docs/settings.md differs from the settings in boneage/config.py: regenerate it with " \
        "`boneage config --markdown > docs/settings.md`"


def test_the_settings_table_holds_every_setting_with_its_default():
    table = settings_markdown(cli.SETTING_FLAGS)
    for name, info in settings().items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"| `{show_value(default_of(info))}` |" in row.replace("\\|", "|"), name
        if name in cli.SETTING_FLAGS:
            assert f"`{cli.SETTING_FLAGS[name]}`" in row


def test_every_flag_sets_a_setting_and_the_old_flag_names_stay():
    known = settings()
    assert all(setting in known for setting in cli.FLAGS.values()), \
        [f for f, s in cli.FLAGS.items() if s not in known]
    # the flags tests, README, docs, workflows and CI use: none may disappear
    assert {"--images", "--labels", "--keypoints", "--storage-options", "--synthetic-n", "--seed",
            "--keypoint-source", "--keypoint-model", "--output", "--address", "--num-cpus", "--verbose",
            "--folds", "--kinds", "--cv-epochs", "--cpus-per-trial", "--gpus-per-trial",
            "--max-concurrent-trials", "--inner-val-fraction", "--test-fraction", "--test-images",
            "--test-labels"} <= set(cli.FLAGS)
    # every flag of a boneage or workflows/ command printed in the README, docs, workflows and CI exists
    parser = cli.build_parser()
    accepted = {o for p in (_full_cv_parser(), *(_subparser(parser, c) for c in ("score", "synth", "config", "serve")))
                for a in p._actions for o in a.option_strings} | {"--skip-preprocess"}
    used = set()
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("workflows/*.py"), ROOT / ".ci" / "run"]:
        for command in path.read_text().replace("\\\n", " ").splitlines() if path.is_file() else []:
            found = re.search(r"\bboneage (synth|preprocess|cv|score|config|serve)\b|workflows/\w+\.py", command)
            if found:  # the flags after the command (not `ray job submit`'s before it)
                used |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", command[found.start():].split("#")[0]))
    assert used and "--folds" in used and not used - accepted, used - accepted


def _subparser(parser, name):
    action = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return action.choices[name]


def _full_cv_parser():
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_run_args(parser)
    cli.add_cv_args(parser)
    cli.add_test_args(parser)
    cli.add_serve_args(parser)
    return parser


def test_each_flag_reaches_its_setting(tmp_path, monkeypatch):
    """Every flag, given a valid value that differs from the default, lands in its setting."""
    monkeypatch.chdir(tmp_path)
    values = {"--storage-options": ('{"anon": true}', {"anon": True}), "--kinds": ("A-reg,B-cls", ("A-reg", "B-cls")),
              "--keypoint-source": ("geometric", "geometric"), "--verbose": (None, True),
              "--test-fraction": ("0.2", 0.2), "--inner-val-fraction": ("0.2", 0.2)}
    for flag, setting in cli.FLAGS.items():
        info = settings()[setting]
        default, kind = default_of(info), type_name(info.annotation)
        if flag in values:
            text, expected = values[flag]
        elif kind.startswith("bool"):
            text, expected = None, True
        elif kind.startswith("int"):
            text, expected = str((default or 0) + 2), (default or 0) + 2
        elif kind.startswith("float"):
            text, expected = str((default or 0) + 0.5), (default or 0) + 0.5
        else:  # a path or an address (local paths are made absolute: a URI stays as it is)
            text = expected = "s3://bucket/x" if setting != "ray.address" else "10.0.0.1:6379"
        config = cli.config_from_args(_full_cv_parser().parse_args([flag] + ([text] if text is not None else [])))
        section, _, key = setting.rpartition(".")
        got = getattr(getattr(config, section) if section else config, key)
        assert got == expected and type(got) is type(expected), (flag, got, expected)


def _help_entries(help_text: str) -> dict[str, str]:
    """Each option of a --help text: its flag -> its whole entry, on one line."""
    entries: dict[str, str] = {}
    flag = None
    for line in help_text.splitlines():
        found = re.match(r"  (--[a-z-]+)", line)
        if found:
            flag = found.group(1)
            entries[flag] = line
        elif flag and line.startswith("    "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return {f: " ".join(e.split()) for f, e in entries.items()}


def test_help_shows_the_models_default_and_the_presets():
    entries = _help_entries(_boneage("config", "--help").stdout)  # every run flag: data, run, CV, test split
    for flag, setting in cli.FLAGS.items():
        info = settings()[setting]
        assert f"(default: {show_value(default_of(info))}" in entries[flag], (flag, entries[flag])
        assert " ".join(info.description.split()) in entries[flag], flag
    assert entries["--cv-epochs"].endswith("(default: 70; rsna.yaml: 50)")
    assert entries["--folds"].endswith("(default: 3; rsna.yaml: 5)")
    assert entries["--inner-val-fraction"].endswith("(default: 0.0; rsna.yaml: 0.15)")
    assert ".safetensors" in entries["--keypoint-model"]
    score = _help_entries(_boneage("score", "--help").stdout)
    assert not [f for f, e in score.items() if "(default: None)" in e]  # a None default is said in words


def _numbers_stated(text: str) -> list[tuple[str, str]]:
    """(setting or flag, value) wherever prose states a default: "`--folds`, default 3",
    "`cv.ensemble` (default `tune`)", "`cv.inner_val_fraction`, default\\n0"."""
    flat = " ".join(text.split())
    return re.findall(r"`(--[a-z-]+|[a-z]+\.[a-z_]+)`,? \(?default:? `?([\w.+-]+?)`?(?=[\s,;:)`]|\.\s|$)", flat)


def test_the_defaults_the_readme_and_docs_state_are_the_codes():
    stated = []
    for path in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]:
        if path.name != "settings.md":
            stated += [(path.name, *found) for found in _numbers_stated(path.read_text())]
    names = {**{f: s for f, s in cli.FLAGS.items()}, **{s: s for s in settings()}}
    checked = set()
    for where, name, value in stated:
        assert name in names, f"{where}: `{name}` is not a setting or a flag"
        setting = names[name]
        actual = default_of(settings()[setting])
        assert yaml.safe_load(value) == actual or value == show_value(actual), \
            f"{where} says `{name}` defaults to {value}; boneage/config.py: {show_value(actual)}"
        checked.add(setting)
    # the ones issue #22 found drifting, wherever still stated, were checked
    assert {"data.test_fraction", "cv.inner_val_fraction"} <= checked, checked
    readme = " ".join(ROOT.joinpath("README.md").read_text().split())
    assert "docs/settings.md" in readme
    assert not re.search(r"`--folds`[^.]*default", readme) and not re.search(r"`--cv-epochs`[^.]*default", readme)


def test_the_stated_defaults_check_can_fail():
    assert _numbers_stated("(`--test-fraction`, default 0.15 of the\nlabelled images") == [("--test-fraction", "0.15")]
    assert _numbers_stated("`cv.ensemble`, default `tune`)") == [("cv.ensemble", "tune")]


@pytest.mark.parametrize("text, line", [
    ("cv: {k: ten}\n", "cv.k='ten' (bad.yaml): must be an integer"),
    ("cv: {epochs: -1}\n", "cv.epochs=-1 (bad.yaml): must be >= 1"),
    ("cv: {kinds: [A-xyz]}\n", "cv.kinds[0]='A-xyz' (bad.yaml): must be one of 'A-reg', 'A-cls', 'B-reg', 'B-cls', "
                               "'C-reg' or 'C-cls'"),
    ("nonsense: 1\n", "nonsense=1 (bad.yaml): unknown setting; known: data, preprocess, keypoints, cv, ray, serve, output"),
    ("cv: {inner_val_fraction: 0.5}\n", "cv.inner_val_fraction=0.5 (bad.yaml): must be in [0, 0.5)"),
    ("cv: {schedule: plateau}\n", "cv: schedule 'plateau' steps on the selection split: set inner_val_fraction > 0"),
    ("keypoints: {epoch: 2}\n", "keypoints.epoch=2 (bad.yaml): unknown setting; did you mean epochs?"),
    ("cv: {k: [1\n", "bad.yaml: not valid YAML at line 2: expected ',' or ']', but got '<stream end>'"),
    ("data: {test_fraction: 0.5}\n", "data.test_fraction=0.5 (bad.yaml): must be in [0, 0.5)"),
    ("cv: {sex_kind: D-sex}\n", "cv.sex_kind='D-sex' (bad.yaml): must be one of 'A-sex', 'B-sex' or 'C-sex'"),
])
def test_a_bad_yaml_value_is_one_line_and_exit_status_2(tmp_path, text, line):
    (tmp_path / "bad.yaml").write_text(text)
    result = _boneage("cv", "--output", str(tmp_path / "run"), "--config", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == f"boneage cv: error: {line}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, line", [
    (["--folds", "ten"], "cv.k=ten (--folds): must be an integer"),
    (["--folds", "1"], "cv.k=1 (--folds): must be >= 2"),
    (["--cv-epochs", "0"], "cv.epochs=0 (--cv-epochs): must be >= 1"),
    (["--inner-val-fraction", "0.7"], "cv.inner_val_fraction=0.7 (--inner-val-fraction): must be in [0, 0.5)"),
    (["--kinds", "A-reg,D-reg"], "cv.kinds[1]=D-reg (--kinds): must be one of 'A-reg', 'A-cls', 'B-reg', 'B-cls', "
                                 "'C-reg' or 'C-cls'"),
    (["--keypoint-source", "cnn"], "keypoints.source=cnn (--keypoint-source): must be one of 'model' or 'geometric'"),
    (["--storage-options", "{bad"], "data.storage_options={bad (--storage-options): must be JSON "
                                    "(Expecting property name enclosed in double quotes)"),
])
def test_a_bad_flag_is_one_line_and_exit_status_2(tmp_path, argv, line):
    result = _boneage("cv", "--output", str(tmp_path / "run"), *argv)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == f"boneage cv: error: {line}\n"


def test_yaml_1_1_numbers_and_quoted_integers_load_as_numbers(tmp_path):
    (tmp_path / "x.yaml").write_text('cv: {lr: 1e-4, k: "5", kinds: [A-reg], bf16: false}\ndata: {synthetic_size: [64, 48]}\n')
    config = load_config(tmp_path / "x.yaml")
    assert config.cv.lr == 0.0001 and isinstance(config.cv.lr, float)  # YAML 1.1 reads 1e-4 as a string
    assert config.cv.k == 5 and isinstance(config.cv.k, int)  # "5" is coerced: the setting says what it is
    assert config.cv.kinds == ("A-reg",) and config.data.synthetic_size == (64, 48)  # lists become tuples


def test_every_preset_loads():
    presets = sorted(ROOT.glob("configs/*.yaml")) + sorted(ROOT.glob("bench/*.yaml"))
    assert len(presets) >= 4
    for path in presets:
        load_config(path)
    rsna = load_config(ROOT / "configs" / "rsna.yaml")
    assert rsna.cv.driver_resources == {"CPU": 0, "trial_driver": 0.01} and rsna.cv.inner_val_fraction == 0.15


def test_the_models_keep_attribute_access_assignment_and_pickling():
    config = Config()
    config.data.images = "/data/images"  # stages fill in paths after loading
    config.cv.k = 1
    with pytest.raises(UserError, match=r"^cv\.k=1: must be >= 2$"):
        check(config)  # run.check_config validates what was assigned
    config.cv.k = 4
    again = pickle.loads(pickle.dumps(config))  # Ray ships configs to its workers
    assert again == config and again.data.images == "/data/images"
    from boneage.distributed.ray_cv import cv_asdict

    shipped = cv_asdict(config.cv)
    assert shipped["kinds"] == list(config.cv.kinds)
    assert CVConfig(**shipped) == config.cv and isinstance(CVConfig(**shipped).kinds, tuple)


def test_the_choices_are_the_networks_and_the_training_loops():
    from boneage.model import networks, train
    from boneage.model.choices import CLS_LOSSES, MODEL_KIND_NAMES, SCHEDULES, SEX_KIND_NAMES

    assert tuple(networks.MODEL_KINDS) == MODEL_KIND_NAMES and tuple(networks.SEX_KINDS) == SEX_KIND_NAMES
    assert train.SCHEDULES is SCHEDULES and train.CLS_LOSSES is CLS_LOSSES


def test_boneage_config_prints_the_resolved_configuration(tmp_path):
    result = _boneage("config", "--config", str(ROOT / "configs" / "rsna.yaml"), "--folds", "4",
                      "--storage-options", '{"secret": "s3cr3t"}', "--output", "runs/x", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["cv"]["k"] == 4 and printed["cv"]["epochs"] == 50  # the flag over the preset over the default
    assert printed["output"] == str(tmp_path / "runs" / "x") and "s3cr3t" not in result.stdout
    markdown = _boneage("config", "--markdown")
    assert markdown.returncode == 0 and markdown.stdout == settings_markdown(cli.SETTING_FLAGS)
