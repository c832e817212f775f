"""A small CRI client for the lab: containerd's RuntimeService over gRPC.

``api.proto`` holds the part of the public CRI API (``runtime.v1``) the lab calls;
``api_pb2.py`` and ``api_pb2.pyi`` are generated from it by ``generate.py`` and
committed; ``client.py`` is the typed client; ``pause_image.py`` builds the sandbox
image locally (``pause.c``, no registry).
"""
