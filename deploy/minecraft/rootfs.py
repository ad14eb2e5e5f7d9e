"""Root filesystems for the flying-squid server, as two layers or one merged directory.

- runtime layer: busybox (the entry script's /bin/sh), the host's node and its shared libraries;
- app layer: /app/start.sh, /app/server.js and the server's node_modules — only flying-squid's
  dependency closure (not the bots' mineflayer), with minecraft-data cut down to the one
  Minecraft version served (its full tree is ~320 MB, mostly other versions and Bedrock).

    python -m deploy.minecraft.rootfs OUT    # builds OUT/runtime, OUT/app and OUT/rootfs

Start the container with `ENTRY` (`/app/start.sh`): the CLI passes no environment, and libuv's
io_uring must be off before node starts (CRIU cannot dump an io_uring instance).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.workloads import shared_libraries

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD = Path(os.environ.get("FERRY_MINECRAFT_BUILD", REPO / "build" / "minecraft"))
NODE = Path("/usr/bin/node")
BUSYBOX = Path("/bin/busybox")
MC_VERSION = "1.16.5"
PORT = 25565
ENTRY = ["/app/start.sh"]
SERVER_PACKAGE = "flying-squid"
# Every file and directory gets this mtime, so a rebuilt layer has the same digest and
# Ferry's layer store uploads it to each host once (SOURCE_DATE_EPOCH convention).
FIXED_MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))
# V8's heap cap: the server needs ~100 MiB; the cap keeps a leak from eating the container.
MAX_OLD_SPACE_MIB = 384

START_SH = f"""#!/bin/sh
# libuv may use io_uring (fs ops, epoll batching); CRIU cannot checkpoint io_uring: keep it off.
export UV_USE_IO_URING=0
export NODE_ENV=production
cd /app
exec /usr/bin/node --max-old-space-size={MAX_OLD_SPACE_MIB} /app/server.js
"""


class KitNotInstalled(RuntimeError):
    """build/minecraft lacks node_modules: run `bash deploy/minecraft/setup.sh` first."""


@dataclass(frozen=True)
class Layers:
    """The two layer directories; stack `app` on `runtime`."""

    runtime: Path
    app: Path


def build_runtime_layer(target: Path) -> Path:
    """busybox, node and node's shared libraries; the bare directories runc mounts over."""
    for d in ("bin", "usr/bin", "proc", "dev", "sys", "tmp", "etc"):
        (target / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, target / "bin" / "busybox")
    for tool in ("sh", "ls", "cat", "ps", "top", "free"):
        link = target / "bin" / tool
        if not link.is_symlink():
            link.symlink_to("busybox")
    for path in [NODE, *shared_libraries(NODE)]:
        dest = target / str(path).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.resolve(), dest)
    (target / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (target / "etc" / "hostname").write_text("minecraft\n")
    return target


def _fix_mtimes(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))


def _dependency_closure(lock: dict[str, object], root: str) -> set[str]:
    """Lock-file keys ("node_modules/a/node_modules/b") of `root` and everything it needs,
    resolved as node does: the nearest node_modules up the tree wins."""
    packages = lock["packages"]
    assert isinstance(packages, dict)
    seen: set[str] = set()
    todo = [f"node_modules/{root}"]
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        entry = packages[key]
        deps = {**entry.get("dependencies", {}), **entry.get("optionalDependencies", {})}
        deps.update(entry.get("peerDependencies", {}))
        for name in deps:
            scope = key
            while True:
                candidate = f"{scope}/node_modules/{name}"
                if candidate in packages:
                    todo.append(candidate)
                    break
                if "/node_modules/" not in scope:
                    if f"node_modules/{name}" in packages:
                        todo.append(f"node_modules/{name}")
                    break  # an optional dependency npm skipped on this platform
                scope = scope.rsplit("/node_modules/", 1)[0]
    return seen


def _minecraft_data_keep(package_dir: Path, version: str) -> set[str]:
    """Paths (relative to the package) of the data files the versions of `version`'s major
    release load: prismarine-* also look data up by major version ("1.16" is 1.16.1's)."""
    data_js = (package_dir / "data.js").read_text()
    pc = data_js.split("\n  'bedrock': {")[0]
    major = re.escape(".".join(version.split(".")[:2]))
    blocks = re.findall(rf"\n    '{major}(?:\.\d+)?': \{{\n(.*?)\n    \}}", pc, re.S)
    if not blocks:
        raise KitNotInstalled(f"minecraft-data has no pc {version}")
    return {p for block in blocks for p in re.findall(r"minecraft-data/data/pc/[^\"']+", block)}


def _copy_minecraft_data(src: Path, dest: Path, version: str) -> None:
    data = Path("minecraft-data") / "data"

    def skip_data(directory: str, names: list[str]) -> set[str]:
        return set(names) if Path(directory) == src / data else set()

    shutil.copytree(src, dest, symlinks=True, ignore=skip_data)
    keep = [
        data / "dataPaths.json",
        data / "pc" / "common",
        data / "bedrock" / "common",  # read at require() time whatever the version
        *(Path(p) for p in _minecraft_data_keep(src, version)),
    ]
    for rel in keep:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if (src / rel).is_dir():
            shutil.copytree(src / rel, dest / rel, dirs_exist_ok=True)
        else:
            shutil.copy2(src / rel, dest / rel)


def build_app_layer(target: Path, build: Path = BUILD) -> Path:
    """/app: the entry script, server.js and flying-squid's node_modules."""
    lock_path = build / "package-lock.json"
    if not (build / "node_modules").is_dir() or not lock_path.exists():
        raise KitNotInstalled(f"{build}/node_modules missing: run bash deploy/minecraft/setup.sh")
    lock = json.loads(lock_path.read_text())
    app = target / "app"
    app.mkdir(parents=True, exist_ok=True)
    for key in sorted(_dependency_closure(lock, SERVER_PACKAGE)):
        src, dest = build / key, app / key
        if dest.exists():
            continue
        if key.endswith("node_modules/minecraft-data"):
            _copy_minecraft_data(src, dest, MC_VERSION)
            continue
        # Nested node_modules are separate lock entries: copied only if in the closure.
        shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("node_modules"))
    shutil.copy2(HERE / "server.js", app / "server.js")
    start = app / "start.sh"
    start.write_text(START_SH)
    start.chmod(0o755)
    return target


def build_layers(target: Path, build: Path = BUILD) -> Layers:
    """Both layers under `target`, rebuilt from scratch."""
    layers = Layers(runtime=target / "runtime", app=target / "app")
    for d in (layers.runtime, layers.app):
        shutil.rmtree(d, ignore_errors=True)
    build_runtime_layer(layers.runtime)
    build_app_layer(layers.app, build)
    for d in (layers.runtime, layers.app):
        _fix_mtimes(d)
    return layers


def build_rootfs(target: Path, build: Path = BUILD) -> Path:
    """One directory for `ferry container run --rootfs`: the layers merged (hard links)."""
    layers = build_layers(target / "layers", build)
    rootfs = target / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    for layer in (layers.runtime, layers.app):
        shutil.copytree(layer, rootfs, symlinks=True, dirs_exist_ok=True, copy_function=os.link)
    _fix_mtimes(rootfs)
    return rootfs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="directory to build into")
    args = parser.parse_args()
    rootfs = build_rootfs(args.out.resolve())
    print(rootfs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
