"""cluster.yaml against the JSON schema that ships inside the ray package, plus the project's own rules."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    jsonschema.validate(_config(), _schema())


def test_the_schema_rejects_a_misspelt_key():  # so that the validation above means something
    config = _config()
    config["available_node_types"]["gpu_worker"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _schema())


def test_nothing_is_open_to_the_world():
    config = _config()
    for rule in config["provider"]["security_group"]["IpPermissions"]:
        for ip_range in rule.get("IpRanges", []):
            assert ip_range["CidrIp"] != "0.0.0.0/0"
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start


def test_gpu_and_cpu_workers_autoscale_from_zero():
    types = _config()["available_node_types"]
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"]
    assert types["head"]["resources"]["CPU"] == 0
    # The CV's trial drivers need the head's custom resource (configs/rsna.yaml), which no worker has.
    from boneage.config import load_config

    wanted = load_config(ROOT / "configs" / "rsna.yaml").cv.driver_resources
    custom = [r for r in wanted if r != "CPU"]
    assert custom and all(types["head"]["resources"].get(r, 0) >= 100 * wanted[r] for r in custom)
    assert not any(r in (types[w].get("resources") or {}) for w in ("cpu_worker", "gpu_worker") for r in custom)
