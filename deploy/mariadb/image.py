"""MariaDB from Debian's packages as an OCI image, built here with mmdebstrap and umoci.

    python -m deploy.mariadb.image rootfs --mirror URL   # build/mariadb/rootfs.tar (make setup)
    python -m deploy.mariadb.image image OUT             # OUT/img, tag `mariadb`

The rootfs comes from the machine's Debian mirror (no registry is reachable here): the
server's and the client's core packages only, without docs, man pages and locales (175 MB).
The image holds an initialised data directory owned by its own user `mysql` (999:999), a
database `sbtest` with a user `sbtest` that may connect from anywhere, and a run config
(User, Entrypoint, Cmd, ExposedPorts) that `ferry container run --image` applies as Docker
would. The server runs with `--innodb-use-native-aio=0`: with native AIO, Debian's build
uses io_uring, which CRIU 4.2.1 cannot dump (Ferry's pre-flight refuses it, naming this fix).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTFS_TAR = REPO / "build" / "mariadb" / "rootfs.tar"
TAG = "mariadb"
PORT = 3306
UID = GID = 999  # the mysql user, as Docker's official image has it
USER, PASSWORD, DATABASE = "sbtest", "sbtest", "sbtest"
PACKAGES = ("mariadb-server-core", "mariadb-client-core")
LEFT_OUT = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
# Small enough that a move carries little memory and little copied-up data file.
SIZES = ("--innodb-buffer-pool-size=32M", "--innodb-log-file-size=8M")
SERVER_ARGS = (
    "/usr/sbin/mariadbd",
    "--datadir=/var/lib/mysql",
    "--bind-address=0.0.0.0",
    f"--port={PORT}",
    "--socket=/run/mysqld/mysqld.sock",
    "--pid-file=/run/mysqld/mysqld.pid",
    "--log-error=/var/lib/mysql/mariadbd.err",
    "--skip-name-resolve",  # clients come by address; there is no DNS in the lab
    "--innodb-use-native-aio=0",  # no io_uring: CRIU cannot dump one
    *SIZES,
)
SETUP_SQL = f"""FLUSH PRIVILEGES;
CREATE DATABASE {DATABASE};
CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}';
GRANT ALL ON {DATABASE}.* TO '{USER}'@'%';
"""


class BuildError(RuntimeError):
    pass


def _run(argv: list[str], what: str, *, cwd: Path | None = None, input: str | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, input=input)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise BuildError(f"{what} failed (exit {done.returncode}): {tail}")


def build_rootfs_tar(mirror: str, target: Path = ROOTFS_TAR) -> Path:
    """The server's rootfs from `mirror`, once: an existing tarball is kept."""
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part.tar")
    excludes = [f"--dpkgopt=path-exclude={pattern}" for pattern in LEFT_OUT]
    suites = [f"deb {mirror} bookworm main", f"deb {mirror} bookworm-updates main"]
    _run(
        ["mmdebstrap", "--variant=essential", f"--include={','.join(PACKAGES)}", *excludes,
         "bookworm", str(partial), *suites],
        "mmdebstrap",
    )  # fmt: skip
    partial.rename(target)
    return target


def build_image(out: Path, rootfs_tar: Path = ROOTFS_TAR) -> Path:
    """An OCI image layout at OUT/img with the image tagged `mariadb`."""
    if not rootfs_tar.is_file():
        raise BuildError(f"{rootfs_tar} is missing: make setup builds it")
    out.mkdir(parents=True, exist_ok=True)
    image = f"img:{TAG}"
    _run(["umoci", "init", "--layout", "img"], "umoci init", cwd=out)
    _run(["umoci", "new", "--image", image], "umoci new", cwd=out)
    _run(["umoci", "unpack", "--image", image, "bundle"], "umoci unpack", cwd=out)
    rootfs = out / "bundle" / "rootfs"
    _run(["tar", "-C", str(rootfs), "--numeric-owner", "-xf", str(rootfs_tar)], "tar")
    _prepare(rootfs)
    for node in (rootfs / "dev").iterdir():  # runc makes /dev; nodes stay out of the image
        node.unlink() if not node.is_dir() or node.is_symlink() else shutil.rmtree(node)
    _run(["umoci", "repack", "--image", image, "bundle"], "umoci repack", cwd=out)
    shutil.rmtree(out / "bundle")
    config = ["--config.user", "mysql", "--config.exposedports", f"{PORT}/tcp",
              "--config.entrypoint", SERVER_ARGS[0], "--config.label", "source=debian"]  # fmt: skip
    for arg in SERVER_ARGS[1:]:
        config += ["--config.cmd", arg]
    _run(["umoci", "config", "--image", image, *config], "umoci config", cwd=out)
    return out / "img"


def _prepare(rootfs: Path) -> None:
    """The user, the data directory and the database, as the server's postinst would."""
    with (rootfs / "etc" / "passwd").open("a") as passwd:
        passwd.write(f"mysql:x:{UID}:{GID}:MariaDB Server:/nonexistent:/usr/sbin/nologin\n")
    with (rootfs / "etc" / "group").open("a") as group:
        group.write(f"mysql:x:{GID}:\n")
    # mariadb-install-db resolves localhost; the rootfs has no /etc/hosts of its own.
    (rootfs / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
    for directory in ("var/lib/mysql", "run/mysqld"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
        shutil.chown(rootfs / directory, UID, GID)
    in_root = ["chroot", str(rootfs)]
    _run(
        [*in_root, "mariadb-install-db", "--user=mysql", "--datadir=/var/lib/mysql",
         "--skip-test-db", "--auth-root-authentication-method=normal", *SIZES],
        "mariadb-install-db",
    )  # fmt: skip
    _run(
        [*in_root, "/usr/sbin/mariadbd", "--bootstrap", "--user=mysql",
         "--datadir=/var/lib/mysql", *SIZES],
        "the database's set-up (mariadbd --bootstrap)",
        input=SETUP_SQL,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.mariadb.image")
    sub = parser.add_subparsers(dest="what", required=True)
    rootfs = sub.add_parser("rootfs", help=f"build {ROOTFS_TAR} (kept once built)")
    rootfs.add_argument("--mirror", default="http://deb.debian.org/debian")
    image = sub.add_parser("image", help="build OUT/img from the rootfs")
    image.add_argument("out", type=Path)
    args = parser.parse_args()
    try:
        if args.what == "rootfs":
            print(build_rootfs_tar(args.mirror))
        else:
            print(build_image(args.out))
    except BuildError as exc:
        print(f"mariadb image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
