"""The lab's sandbox ("pause") image, built here: no registry is ever asked.

``pause.c`` is compiled static with gcc (Debian's gcc and libc6-dev, installed by the
Makefile), put as ``/pause`` into a one-layer OCI image, and written as an OCI image
layout tarball that ``ctr images import`` reads. The tarball is cached under the repo's
git-ignored ``build/lab/``, named by the hash of everything it is made from, and rebuilt
when missing; it is byte-for-byte reproducible (fixed mtimes, owners, order).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
import tempfile
from pathlib import Path

PAUSE_SOURCE = Path(__file__).resolve().with_name("pause.c")
# A name no registry serves: containerd must find it imported, never pull it.
PAUSE_IMAGE = "localhost/ultranet-lab/pause:1"
CACHE_DIR = Path(__file__).resolve().parents[3] / "build" / "lab"
_GCC = ["gcc", "-static", "-Os", "-s", "-o"]
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# OCI's (Go's) name for this machine's architecture; gcc builds for this machine.
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class PauseImageError(RuntimeError):
    """The pause image cannot be built; the message says what failed."""


def image_tarball(cache_dir: Path = CACHE_DIR) -> Path:
    """The OCI layout tarball of ``PAUSE_IMAGE``, built into ``cache_dir`` if missing."""
    # Named by everything that makes it: the C source, this builder, the machine.
    made_of = PAUSE_SOURCE.read_bytes() + Path(__file__).read_bytes() + ARCH.encode()
    recipe = hashlib.sha256(made_of).hexdigest()
    path = cache_dir / f"pause-{recipe[:16]}.oci.tar"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = oci_layout(compile_pause())
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".pause-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tarball)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def compile_pause() -> bytes:
    """``pause.c`` as a static executable."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pause"
        try:
            subprocess.run(
                [*_GCC, str(out), str(PAUSE_SOURCE)], check=True, capture_output=True, text=True
            )
        except FileNotFoundError as err:
            raise PauseImageError("gcc not found: `make deps` installs gcc and libc6-dev") from err
        except subprocess.CalledProcessError as err:
            raise PauseImageError(f"gcc failed on {PAUSE_SOURCE}: {err.stderr.strip()}") from err
        return out.read_bytes()


def _tar(files: list[tuple[str, bytes, int]]) -> bytes:
    """A reproducible tar of (name, content, mode): owner root, mtime 0, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_layout(pause: bytes) -> bytes:
    """An OCI image layout (image-spec ``image-layout.md``) holding one image, tagged
    ``PAUSE_IMAGE``, whose one layer is ``/pause``."""
    layer_tar = _tar([("pause", pause, 0o755)])
    layer = gzip.compress(layer_tar, mtime=0)
    config = json.dumps(
        {
            "architecture": ARCH,
            "os": "linux",
            "config": {"Entrypoint": ["/pause"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": _MANIFEST,
            "config": {"mediaType": _CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": _LAYER, "digest": _digest(layer), "size": len(layer)}],
        },
        sort_keys=True,
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": _MANIFEST,
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": ARCH, "os": "linux"},
                    # ctr import names the image from this annotation.
                    "annotations": {
                        "io.containerd.image.name": PAUSE_IMAGE,
                        "org.opencontainers.image.ref.name": PAUSE_IMAGE.rsplit(":", 1)[1],
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    blobs = [
        (f"blobs/sha256/{_digest(blob).split(':')[1]}", blob, 0o644)
        for blob in (layer, config, manifest)
    ]
    return _tar(
        [
            ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}', 0o644),
            ("index.json", index, 0o644),
            *blobs,
        ]
    )
