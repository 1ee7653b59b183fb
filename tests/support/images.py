"""Container images without a registry: docker-archive tars built from files on this machine, for containerd's
``ctr images import``. A ``pause`` image (a tiny static C program, built here with gcc) for pod sandboxes, and a
``busybox`` image (Debian's busybox-static) for test pods (``imagePullPolicy: Never``)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAUSE_IMAGE = "fuyao.local/pause:3.10"
BUSYBOX_IMAGE = "fuyao.local/busybox:1"
BUSYBOX_APPLETS = ("sh", "sleep", "env", "cat", "ls", "echo", "true", "wget", "grep", "printenv", "test", "ps")

PAUSE_C = r"""
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }
static void quit(int s) { (void)s; _exit(0); }
int main(void) {
    signal(SIGCHLD, reap); signal(SIGINT, quit); signal(SIGTERM, quit);
    for (;;) pause();
}
"""


def _archive(path: Path, tag: str, files: dict[str, tuple[bytes | None, int, str | None]], cmd: list[str]) -> Path:
    """Write a docker-archive: ``files`` maps path → (content, mode, symlink target)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        dirs = sorted({str(Path(p).parent) for p in files if str(Path(p).parent) != "."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, (content, mode, link) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.mode = mode
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(content or b"")
                tar.addfile(info, io.BytesIO(content or b""))
    return write_docker_archive(path, [tag], [layer.getvalue()], {"Cmd": cmd, "Env": ["PATH=/bin"]},
                                ["fuyao tests"])


@dataclass(frozen=True)
class Image:
    """One image of a docker-archive: its tags, its layers (uncompressed layer tars, bottom first, in memory or as
    files), its runtime config (Entrypoint, Cmd, Env…) and one history entry per layer."""

    tags: list[str]
    layers: Sequence[bytes | Path]
    config: dict[str, Any]
    history: list[str]


def _digest(layer: bytes | Path) -> str:
    digest = hashlib.sha256()
    if isinstance(layer, bytes):
        digest.update(layer)
    else:
        with open(layer, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def write_images(path: Path, images: Sequence[Image]) -> Path:
    """Write a docker-archive (what ``ctr images import`` reads) holding ``images``; a layer they share (the same
    file or the same bytes) is stored once."""
    stored: dict[str, tuple[str, bytes | Path]] = {}  # digest -> (name in the archive, layer)
    entries, configs = [], []
    for image in images:
        digests = [_digest(layer) for layer in image.layers]
        for digest, layer in zip(digests, image.layers, strict=True):
            stored.setdefault(digest, (f"{digest}/layer.tar", layer))
        config = {"architecture": "amd64", "os": "linux", "config": image.config,
                  "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in digests]},
                  "history": [{"created_by": h} for h in image.history]}
        config_bytes = json.dumps(config).encode()
        config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
        configs.append((config_name, config_bytes))
        entries.append({"Config": config_name, "RepoTags": image.tags, "Layers": [stored[d][0] for d in digests]})

    def add(out: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as out:
        for name, layer in stored.values():
            if isinstance(layer, bytes):
                add(out, name, layer)
            else:
                out.add(layer, arcname=name)
        for config_name, config_bytes in configs:
            add(out, config_name, config_bytes)
        add(out, "manifest.json", json.dumps(entries).encode())
    return path


def write_docker_archive(path: Path, tags: list[str], layers: Sequence[bytes | Path], config: dict[str, Any],
                         history: list[str]) -> Path:
    """A docker-archive of one image (``write_images``)."""
    return write_images(path, [Image(tags, layers, config, history)])


def compile_pause(binary: Path) -> Path:
    """The pause program (``PAUSE_C``), compiled statically to ``binary``."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("the pause image needs a C compiler (apt-get install gcc libc6-dev)")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "pause.c"
        source.write_text(PAUSE_C)
        subprocess.run([gcc, "-static", "-Os", "-o", str(binary), str(source)], check=True, capture_output=True)
    return binary


def build_pause(out_dir: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        binary = compile_pause(Path(tmp) / "pause")
        return _archive(out_dir / "pause.tar", PAUSE_IMAGE, {"pause": (binary.read_bytes(), 0o755, None)},
                        ["/pause"])


def build_busybox(out_dir: Path) -> Path:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise RuntimeError("the busybox image needs busybox-static (apt-get install busybox-static)")
    files: dict[str, tuple[bytes | None, int, str | None]] = {"bin/busybox": (busybox.read_bytes(), 0o755, None)}
    for applet in BUSYBOX_APPLETS:
        files[f"bin/{applet}"] = (None, 0o777, "busybox")
    files["tmp/.keep"] = (b"", 0o644, None)
    return _archive(out_dir / "busybox.tar", BUSYBOX_IMAGE, files, ["/bin/sh"])
