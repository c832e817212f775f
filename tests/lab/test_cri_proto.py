"""The lab's CRI client: its committed generated code matches its .proto, and its wire
names and field numbers are the public CRI API's (no root needed)."""

from __future__ import annotations

from tools.lab.cri import api_pb2 as api
from tools.lab.cri.generate import stale


def test_the_committed_pb2_modules_are_what_generate_writes() -> None:
    assert stale() == [], "run: .venv/bin/python -m tools.lab.cri.generate"


def test_the_service_and_fields_are_named_and_numbered_as_in_the_cri_api() -> None:
    # Spot checks against k8s.io/cri-api pkg/apis/runtime/v1/api.proto: a wrong number
    # would be read by containerd as another field, silently.
    service = api.DESCRIPTOR.services_by_name["RuntimeService"]
    assert service.full_name == "runtime.v1.RuntimeService"
    assert sorted(m.name for m in service.methods) == [
        "ListPodSandbox",
        "PodSandboxStatus",
        "RemovePodSandbox",
        "RunPodSandbox",
        "StopPodSandbox",
        "Version",
    ]
    numbers = {
        "PodSandboxConfig": {
            "metadata": 1,
            "hostname": 2,
            "labels": 6,
            "annotations": 7,
            "linux": 8,
        },
        "PodSandboxStatus": {"id": 1, "state": 3, "network": 5, "linux": 6, "annotations": 8},
        "PodSandboxStatusResponse": {"status": 1, "info": 2, "timestamp": 4},
        "LinuxSandboxSecurityContext": {"namespace_options": 1, "privileged": 6},
        "Namespace": {"options": 2},
        "RunPodSandboxRequest": {"config": 1, "runtime_handler": 2},
    }
    for message, fields in numbers.items():
        descriptor = api.DESCRIPTOR.message_types_by_name[message]
        assert {name: descriptor.fields_by_name[name].number for name in fields} == fields
