"""Render deploy/kustomize without the kustomize binary.

The base uses three kustomize features only (tests hold it to them): ``resources`` (files,
each a YAML stream), ``namespace`` (set on every namespaced object) and ``images``
(``name`` → ``newName:newTag`` in every container and init container).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
CONTAINERFILE = DEPLOY / "Containerfile"
DOCKERIGNORE = DEPLOY / "Containerfile.dockerignore"
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


# -- deploy/Containerfile and its build context (no container engine here) ------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker compiles it (moby/patternmatcher): `*` and `?` stay
    within one path segment, `**` spans any number of them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i == len(pattern) else "(?:.*/)?"
            continue
        char = pattern[i]
        out += "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
        i += 1
    return re.compile(out)


def ignore_rules() -> list[tuple[re.Pattern[str], bool]]:
    """(pattern, re-includes) per line of the dockerignore, in order."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((_ignore_regex(pattern), negated))
    return rules


def in_build_context(path: str) -> bool:
    """Whether Docker sends the repository file `path` to the build: the last rule that
    matches it or one of its parent directories decides (Docker's MatchesOrParentMatches)."""
    parts = path.split("/")
    candidates = [path] + ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
    excluded = False
    for regex, negated in ignore_rules():
        if negated == excluded and any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return not excluded


def copied_from_context() -> dict[str, list[str]]:
    """Per stage (its ``AS`` name; the unnamed final stage is ""), the COPY sources it takes
    from the build context."""
    stages: dict[str, list[str]] = {}
    stage = ""
    for word, rest in instructions():
        if word == "FROM":
            stage = rest.split()[-1] if " AS " in rest.upper() else ""
            stages[stage] = []
        elif word == "COPY" and "--from=" not in rest:
            *sources, _dest = [a for a in rest.split() if not a.startswith("--")]
            stages[stage] += sources
    return stages


def context_files(sources: list[str]) -> list[str]:
    """The repository files (relative, POSIX) that COPY of `sources` puts into the image."""
    out = []
    for source in sources:
        root = REPO / source
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in paths:
            relative = path.relative_to(REPO).as_posix()
            if in_build_context(relative):
                out.append(relative)
    return sorted(out)
