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


def write_docker_archive(path: Path, tags: list[str], layers: Sequence[bytes | Path], config: dict[str, Any],
                         history: list[str]) -> Path:
    """Write a docker-archive (what ``ctr images import`` reads): ``layers`` are uncompressed layer tars, bottom
    first, in memory or as files; ``config`` is the image's runtime config (Cmd, Env…); one history entry per
    layer."""
    diff_ids = []
    for layer in layers:
        digest = hashlib.sha256()
        if isinstance(layer, bytes):
            digest.update(layer)
        else:
            with open(layer, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        diff_ids.append("sha256:" + digest.hexdigest())
    image = {"architecture": "amd64", "os": "linux", "config": config,
             "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": [{"created_by": h} for h in history]}
    config_bytes = json.dumps(image).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    names = [f"{i}/layer.tar" for i in range(len(layers))]
    manifest = json.dumps([{"Config": config_name, "RepoTags": tags, "Layers": names}]).encode()

    def add(out: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as out:
        for name, layer in zip(names, layers, strict=True):
            if isinstance(layer, bytes):
                add(out, name, layer)
            else:
                out.add(layer, arcname=name)
        add(out, config_name, config_bytes)
        add(out, "manifest.json", manifest)
    return path


def build_pause(out_dir: Path) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("the pause image needs a C compiler (apt-get install gcc libc6-dev)")
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "pause.c", Path(tmp) / "pause"
        source.write_text(PAUSE_C)
        subprocess.run([gcc, "-static", "-Os", "-o", str(binary), str(source)], check=True, capture_output=True)
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
