"""cluster.yaml is a valid Ray cluster launcher config, checked offline with Ray's own code."""

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml
from helpers import ROOT
from ray.autoscaler._private.util import prepare_config, validate_config  # Ray's own offline checks


def test_cluster_yaml_passes_rays_schema_and_cross_field_checks():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(raw)]
    assert errors == []
    validate_config(prepare_config(raw))  # defaults merged, then Ray's own validation (raises on error)


def test_cluster_yaml_is_cpu_only_with_a_loopback_dashboard_and_installs_quantray():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    workers = raw["available_node_types"]["cpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1  # autoscaling CPU workers
    assert all("GPU" not in t.get("resources", {}) for t in raw["available_node_types"].values())
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])
    assert any("pip install" in c and "quantray" in c for c in raw["setup_commands"])
