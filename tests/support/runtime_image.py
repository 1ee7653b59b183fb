"""fuyao's runtime image without Docker or a registry: four layers packed into a docker-archive for
``ctr images import`` (the local cluster) — a Debian minbase root file system with python3 (``debootstrap``), the
Python dependencies (``pip install --target`` from this machine's pip: same Debian, same Python minor), helm (the
NPU operator renders fuyao's charts with it), and fuyao itself with its charts. Each layer is cached under
``~/.cache/fuyao/images`` by the hash of what makes it (suite and packages; the dependency list; the helm binary;
the source files), so a rebuild after a code change repacks only the last layer.

With ``--ray``, the Ray image ``fuyao.local/fuyao-ray``: the same layers, with ``ray[serve]`` (``RAY_VERSION`` in
``hack/cluster/versions.env``) installed beside the dependencies, for KubeRay's head and worker pods and Ray Serve
applications that run fuyao's engines (docs/ray.md).

Usage: python -m tests.support.runtime_image [--cache DIR] [--ray]   (prints the archive path and the image tag)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .apiserver import binary
from .images import Image, write_docker_archive, write_images
from .versions import pinned_version

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FUYAO_CACHE", Path.home() / ".cache" / "fuyao")) / "images"
IMAGE_REPOSITORY = "fuyao.local/fuyao"
RAY_IMAGE_REPOSITORY = "fuyao.local/fuyao-ray"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "ca-certificates")
RAY_BASE_PACKAGES = (*BASE_PACKAGES, "wget")
"""KubeRay's liveness and readiness probes run ``bash -c "wget … | grep success"`` in the Ray container."""
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"  # on Debian's python3 sys.path
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
"""fuyao's console scripts (``fuyao-device-plugin = fuyao.deviceplugin.cli:main``...): the image has them at
``/usr/local/bin``, as ``pip install`` would write them, and the charts run them."""
CHARTS_IN_IMAGE = "opt/fuyao/charts"
"""fuyao's charts, which the NPU operator renders (``helm template``) for the components it installs."""
HELM_IN_IMAGE = "usr/local/bin/helm"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""Every image's PATH, Debian's root one (kube-proxy and fuyao-kindnet in a kind node run iptables from sbin)."""


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _log(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def _pack(root: Path, out: Path) -> None:
    """A layer tar of ``root`` (numeric owners; no device nodes or mount points' contents)."""
    tmp = out.with_suffix(".tmp")
    subprocess.run(["tar", "--numeric-owner", "--sort=name", "--mtime=@0", "-C", str(root),
                    "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*", "-cf", str(tmp), "."],
                   check=True)
    tmp.rename(out)


def base_layer(cache: Path = CACHE, packages: tuple[str, ...] = BASE_PACKAGES) -> Path:
    out = cache / f"base-{SUITE}-{_key(SUITE, packages, 'minbase')}.tar"
    if out.exists():
        return out
    if shutil.which("debootstrap") is None:
        raise RuntimeError("the runtime image's base needs debootstrap (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise RuntimeError("debootstrap needs root")
    started = time.monotonic()
    _log(f"debootstrap {SUITE} minbase + {' '.join(packages)} (once; cached as {out.name})")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE,
                        str(root), MIRROR], check=True, stdout=subprocess.DEVNULL)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log", "usr/share/doc", "usr/share/man"):
            for path in (root / junk).glob("*"):
                if path.is_file() or path.is_symlink():
                    path.unlink()
                elif path.is_dir():
                    shutil.rmtree(path)
        _pack(root, out)
    _log(f"base layer in {time.monotonic() - started:.0f} s: {out}")
    return out


def dependencies() -> list[str]:
    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def ray_requirement() -> str:
    return f"ray[serve]=={pinned_version('RAY_VERSION')}"


def deps_layer(cache: Path = CACHE, extra: tuple[str, ...] = ()) -> Path:
    """The dependencies in one ``pip install`` (resolved together), plus ``extra`` requirements (the Ray image's
    ``ray[serve]``)."""
    requirements = dependencies() + list(extra)
    out = cache / f"deps-{_key(requirements, sys.version_info[:2], 'scripts')}.tar"
    if out.exists():
        return out
    started = time.monotonic()
    _log(f"pip install {len(requirements)} dependencies into the image's site-packages")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        target = Path(tmp) / SITE_PACKAGES
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-script-location",
                        "--only-binary=:all:", "--target", str(target), *requirements], check=True)
        _console_scripts(target / "bin", Path(tmp) / "usr" / "local" / "bin")
        _pack(Path(tmp), out)
    _log(f"dependency layer in {time.monotonic() - started:.0f} s: {out}")
    return out


def _console_scripts(made: Path, dest: Path) -> None:
    """pip's console scripts (``ray``, ``serve``…) at ``/usr/local/bin`` with the image's python as their
    interpreter (pip wrote this machine's)."""
    if not made.is_dir():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for script in sorted(made.iterdir()):
        data = script.read_bytes()
        if not data.startswith(b"#!") or b"python" not in data.split(b"\n", 1)[0]:
            continue  # not a Python entry point (activate scripts and the like)
        target = dest / script.name
        target.write_bytes(b"#!/usr/bin/python3\n" + data.split(b"\n", 1)[1])
        target.chmod(0o755)
    shutil.rmtree(made)


def tools_layer(cache: Path = CACHE) -> Path:
    """helm (built by hack/build-upstream.sh), for the NPU operator."""
    helm = Path(binary("helm"))
    data = helm.read_bytes()
    out = cache / f"tools-{hashlib.sha256(data).hexdigest()[:16]}.tar"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        target = Path(tmp) / HELM_IN_IMAGE
        target.parent.mkdir(parents=True)
        target.write_bytes(data)
        target.chmod(0o755)
        _pack(Path(tmp), out)
    return out


def source_files() -> list[Path]:
    """What the app layer is made of: pyproject, the charts, and the ``fuyao`` namespace with its components (the
    symlinks ``fuyao/<component>`` lead to their folders at the top of the tree; ``rglob`` does not follow them)."""
    files = [REPO / "pyproject.toml"]
    files += sorted(p for p in (REPO / "charts").rglob("*") if p.is_file())
    homes = [REPO / "fuyao", *(p.resolve() for p in sorted((REPO / "fuyao").iterdir()) if p.is_symlink())]
    for home in homes:
        files += sorted(p for p in home.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return files


def _fuyao_scripts(dest: Path) -> None:
    """``[project.scripts]`` as pip writes them: ``/usr/local/bin/<name>`` calling ``module:function``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, target in SCRIPTS.items():
        module, function = target.split(":")
        script = dest / name
        script.write_text(f"#!/usr/bin/python3\nimport sys\nfrom {module} import {function}\n\n"
                          f"if __name__ == \"__main__\":\n    sys.exit({function}())\n")
        script.chmod(0o755)


def app_layer(cache: Path = CACHE) -> Path:
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    out = cache / f"app-{digest.hexdigest()[:16]}.tar"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        target = Path(tmp) / SITE_PACKAGES
        # the namespace as pip would install it: copytree follows the component symlinks (copies their folders)
        shutil.copytree(REPO / "fuyao", target / "fuyao", ignore=shutil.ignore_patterns("__pycache__"))
        _fuyao_scripts(Path(tmp) / "usr" / "local" / "bin")
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-d", "/" + SITE_PACKAGES, str(target)],
                       check=True)
        shutil.copytree(REPO / "charts", Path(tmp) / CHARTS_IN_IMAGE)
        _pack(Path(tmp), out)
    return out


def build(cache: Path = CACHE, ray: bool = False) -> tuple[Path, str]:
    """The docker-archive of the runtime image (built or reused) and its tag; ``ray``: the Ray image."""
    cache.mkdir(parents=True, exist_ok=True)
    extra = (ray_requirement(),) if ray else ()
    packages = RAY_BASE_PACKAGES if ray else BASE_PACKAGES
    layers = [base_layer(cache, packages), deps_layer(cache, extra), tools_layer(cache), app_layer(cache)]
    repository, prefix = (RAY_IMAGE_REPOSITORY, "fuyao-ray") if ray else (IMAGE_REPOSITORY, "fuyao")
    tag = f"{repository}:{_key([p.name for p in layers])[:12]}"
    out = cache / f"{prefix}-{tag.rsplit(':', 1)[1]}.tar"
    if out.exists():
        return out, tag
    tmp = out.with_suffix(".tmp")
    write_docker_archive(
        tmp, [tag, f"{repository}:dev"], layers,
        {"Env": [f"PATH={IMAGE_PATH}", "PYTHONUNBUFFERED=1",
                 "PYTHONDONTWRITEBYTECODE=1"],
         "Cmd": ["python3", "-m", "fuyao.cli", "--help"], "WorkingDir": "/",
         "Labels": {"org.opencontainers.image.source": "fuyao (local build)"}},
        [f"debootstrap {SUITE} minbase + {' '.join(packages)}",
         f"pip install --target (pyproject dependencies{', ' + extra[0] if extra else ''})",
         "helm (hack/build-upstream.sh)", "fuyao packages and charts"])
    tmp.rename(out)
    for stale in cache.glob(f"{prefix}-{'?' * 12}.tar"):  # keep the newest archive only (layers stay cached)
        if stale != out:
            stale.unlink()
    return out, tag


@dataclass(frozen=True)
class BinaryImage:
    """An image of locally built binaries on the Debian base layer: ``files`` maps a path in the image to a file on
    this machine; ``entrypoint`` and ``cmd`` as the upstream image has them (manifests and operators rely on them)."""

    tag: str
    files: dict[str, Path]
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    workdir: str = ""
    user: str = ""  # as the upstream image's USER (a pod with runAsNonRoot needs a numeric one)


def _binary_layer(image: BinaryImage, cache: Path) -> Path:
    """One layer with ``image.files``, cached by what they are (path, size, modification time)."""
    stamp = [(dest, str(src.resolve()), src.stat().st_size, src.stat().st_mtime_ns)
             for dest, src in image.files.items()]
    layer = cache / f"bin-{_key(stamp)}.tar"
    if not layer.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            for dest, src in image.files.items():
                target = Path(tmp) / dest.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
                target.chmod(0o755)
            _pack(Path(tmp), layer)
    return layer


def binary_images(images: list[BinaryImage], name: str, cache: Path = CACHE,
                  base: Path | None = None) -> tuple[Path, list[str]]:
    """One docker-archive ``<name>-<key>.docker.tar`` holding ``images`` (they share the base layer: ``base``, or the
    runtime image's); returns it and the tags. Rebuilt only when a binary changes."""
    cache.mkdir(parents=True, exist_ok=True)
    base = base or base_layer(cache)
    layers = [_binary_layer(image, cache) for image in images]
    key = _key([base.name], [layer.name for layer in layers],
               [(i.tag, i.entrypoint, i.cmd, i.workdir, i.user) for i in images], IMAGE_PATH)
    out = cache / f"{name}-{key}.docker.tar"
    if not out.exists():
        for stale in cache.glob(f"{name}-*.docker.tar"):
            stale.unlink()
        specs = []
        for image, layer in zip(images, layers, strict=True):
            config: dict[str, object] = {"Env": [f"PATH={IMAGE_PATH}"], "Entrypoint": image.entrypoint,
                                         "Cmd": image.cmd}
            if image.workdir:
                config["WorkingDir"] = image.workdir
            if image.user:
                config["User"] = image.user
            specs.append(Image([image.tag], [base, layer], config,
                               [f"debootstrap {SUITE} minbase", f"{', '.join(image.files)} (local build)"]))
        write_images(out.with_suffix(".tmp"), specs)
        out.with_suffix(".tmp").rename(out)
    return out, [image.tag for image in images]


def kube_scheduler_image(scheduler: Path, version: str, cache: Path = CACHE) -> tuple[Path, str]:
    """An image of the locally built kube-scheduler (``fuyao.local/kube-scheduler:<version>``) on the same Debian
    base layer, for the scheduler-extender chart's optional second scheduler on the local cluster (the chart
    defaults to registry.k8s.io's image)."""
    tag = f"fuyao.local/kube-scheduler:{version}"
    image = BinaryImage(tag, {"/usr/local/bin/kube-scheduler": scheduler}, cmd=["kube-scheduler", "--help"])
    out, _ = binary_images([image], f"kube-scheduler-{version}", cache)
    return out, tag


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.runtime_image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--ray", action="store_true", help="the Ray image (ray[serve] beside fuyao)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    path, tag = build(args.cache, ray=args.ray)
    print(json.dumps({"archive": str(path), "tag": tag, "seconds": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
