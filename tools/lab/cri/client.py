"""A typed CRI RuntimeService client over gRPC on a Unix socket, as the kubelet calls it.

Each method sends one ``runtime.v1.RuntimeService`` call with the message classes of
``api_pb2`` (generated from ``api.proto``) and returns the answer; a failed call raises
``grpc.RpcError`` with containerd's status and message (the CNI plugin's error text,
for a sandbox whose network set-up failed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from tools.lab.cri import api_pb2 as api

_SERVICE = "/runtime.v1.RuntimeService/"
Reply = TypeVar("Reply", bound=Message)


class RuntimeClient:
    """``RuntimeClient(socket)``; a context manager that closes its channel."""

    def __init__(self, socket: Path | str, *, timeout: float = 60.0) -> None:
        self.socket = Path(socket)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{self.socket}")

    def __enter__(self) -> RuntimeClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(
        self, method: str, request: Message, reply: type[Reply], timeout: float | None
    ) -> Reply:
        parse: Callable[[bytes], Reply] = reply.FromString
        stub = self._channel.unary_unary(
            _SERVICE + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=parse,
        )
        answer: Reply = stub(request, timeout=self.timeout if timeout is None else timeout)
        return answer

    def version(self, *, timeout: float | None = None) -> api.VersionResponse:
        return self._call("Version", api.VersionRequest(version="v1"), api.VersionResponse, timeout)

    def run_pod_sandbox(
        self,
        name: str,
        *,
        namespace: str = "default",
        uid: str | None = None,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        runtime_handler: str = "",
    ) -> str:
        """RunPodSandbox of a pod in its own network namespace; returns the sandbox id.
        ``runtime_handler``: a runtime of containerd's config ("": its default)."""
        config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(
                name=name, namespace=namespace, uid=uid or f"uid-{name}", attempt=0
            ),
            hostname=name,
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            linux=api.LinuxPodSandboxConfig(
                security_context=api.LinuxSandboxSecurityContext(
                    namespace_options=api.NamespaceOption(network=api.POD, pid=api.POD, ipc=api.POD)
                )
            ),
        )
        reply = self._call(
            "RunPodSandbox",
            api.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler),
            api.RunPodSandboxResponse,
            None,
        )
        return reply.pod_sandbox_id

    def pod_sandbox_status(
        self, sandbox_id: str, *, verbose: bool = False
    ) -> api.PodSandboxStatusResponse:
        return self._call(
            "PodSandboxStatus",
            api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose),
            api.PodSandboxStatusResponse,
            None,
        )

    def sandbox_info(self, sandbox_id: str) -> dict[str, Any]:
        """containerd's verbose ``info`` document of a sandbox (pid, runtime spec, CNI result)."""
        info: dict[str, Any] = json.loads(
            self.pod_sandbox_status(sandbox_id, verbose=True).info["info"]
        )
        return info

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self._call(
            "StopPodSandbox",
            api.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
            api.StopPodSandboxResponse,
            None,
        )

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self._call(
            "RemovePodSandbox",
            api.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
            api.RemovePodSandboxResponse,
            None,
        )

    def list_pod_sandbox(self) -> list[api.PodSandbox]:
        reply = self._call(
            "ListPodSandbox", api.ListPodSandboxRequest(), api.ListPodSandboxResponse, None
        )
        return list(reply.items)
