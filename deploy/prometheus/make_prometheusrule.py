"""Write deploy/base/prometheusrule.yaml from deploy/prometheus/alerts.yaml (one source of alert rules).

Run after editing alerts.yaml: `.venv/bin/python deploy/prometheus/make_prometheusrule.py`.
tests/test_deploy.py fails while the two files hold different rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["main", "render"]

HERE = Path(__file__).resolve().parent
ALERTS = HERE / "alerts.yaml"
TARGET = HERE.parent / "base" / "prometheusrule.yaml"

HEADER = """\
# The alert rules of deploy/prometheus/alerts.yaml as a Prometheus Operator resource (same groups;
# tests/test_deploy.py fails when the two differ). Edit alerts.yaml, then regenerate this file:
#   .venv/bin/python deploy/prometheus/make_prometheusrule.py
# kube-prometheus-stack selects rules labelled with its release unless installed with
# prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false (docs/operations.md does).
"""


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so PromQL stays readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def render(alerts: Path = ALERTS) -> str:
    """The PrometheusRule manifest holding the groups of `alerts`."""
    groups: list[dict[str, Any]] = yaml.safe_load(alerts.read_text())["groups"]
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "jetinfer-worker", "labels": {"app.kubernetes.io/component": "worker"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=110)


def main() -> None:
    """Regenerate the PrometheusRule."""
    TARGET.write_text(render())
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
