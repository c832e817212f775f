"""Render deploy/kustomize without the kustomize binary.

The base uses three kustomize features only (tests hold it to them): ``resources`` (files,
each a YAML stream), ``namespace`` (set on every namespaced object) and ``images``
(``name`` → ``newName:newTag`` in every container and init container).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((KUSTOMIZE / "kustomization.yaml").read_text())


def _pod_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def render(base: Path = KUSTOMIZE) -> list[dict[str, Any]]:
    kust = yaml.safe_load((base / "kustomization.yaml").read_text())
    unsupported = set(kust) - SUPPORTED_FIELDS
    if unsupported:
        raise ValueError(f"kustomization.yaml uses {sorted(unsupported)}: teach render() first")
    images = {i["name"]: i for i in kust.get("images", [])}
    out: list[dict[str, Any]] = []
    for resource in kust["resources"]:
        for obj in yaml.safe_load_all((base / resource).read_text()):
            if obj is None:
                continue
            if "namespace" in kust and obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
            for container in _pod_containers(obj):
                name, _, tag = container["image"].partition(":")
                if name in images:
                    new = images[name]
                    container["image"] = f"{new.get('newName', name)}:{new.get('newTag', tag)}"
            out.append(obj)
    return out


@pytest.fixture(scope="session")
def rendered() -> list[dict[str, Any]]:
    return render()


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def containers(ds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in _pod_containers(ds)}
