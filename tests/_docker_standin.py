"""Stand-ins for base images that no registry serves here, built from Debian packages.

``make test-docker`` needs the images ``docker/Dockerfile`` and
``docker/compose.yaml`` name. When one is neither in the engine nor pullable, a
stand-in is bootstrapped with ``mmdebstrap`` from the host's Debian release and
mirror, and imported with ``docker import``:

``python``
    for ``python:3.11-slim`` (the tag the Dockerfile names): Debian minbase with
    python3 (3.11 on bookworm), pip and venv, ``python``/``pip`` where the
    official image has them, no PEP 668 marker (the official image's pip installs
    freely), and the host's way to reach the package indexes: the CAs the host
    trusts (it may reach them through a TLS-intercepting proxy), a ``pip.conf``
    made from the host's pip settings, and the host's apt sources and acquire
    settings, so that ``pip`` and ``apt-get`` in a build (``--network host``) work.
``prometheus``
    for ``prom/prometheus``: Debian's ``prometheus`` package and ``wget`` (the
    health check), run as user ``prometheus`` in ``/prometheus``.

The root file systems are kept as tarballs in ``<root>/images`` (a cache: a
later run only imports them). mmdebstrap runs :func:`main` inside the chroot's
customize hook (``python -m tests._docker_standin customize KIND DIR``), so this
module imports nothing but the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
#: pip settings that mean the same inside a container on the host's network.
PIP_KEYS = {"index-url", "extra-index-url", "find-links", "trusted-host", "timeout", "retries",
            "proxy", "disable-pip-version-check"}  # fmt: skip
PIP_URL_KEYS = {"index-url", "extra-index-url", "find-links"}
PIP_ALIASES = {"default-timeout": "timeout"}
#: What no container needs.
TRIM = ("usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "var/cache/apt/*.bin")


@dataclass(frozen=True)
class StandIn:
    """One stand-in image: what to bootstrap and how the image runs."""

    kind: str
    packages: tuple[str, ...]
    changes: tuple[str, ...]  # docker import --change
    dpkg_excludes: tuple[str, ...] = ()


STANDINS = {
    "python": StandIn(
        kind="python",
        packages=("python3", "python3-pip", "python3-venv", "ca-certificates"),
        changes=(
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["python3"]',
        ),
    ),
    "prometheus": StandIn(
        kind="prometheus",
        packages=("prometheus", "wget", "ca-certificates"),
        changes=(
            "USER prometheus",
            "WORKDIR /prometheus",
            'ENTRYPOINT ["/usr/bin/prometheus"]',
            'CMD ["--config.file=/etc/prometheus/prometheus.yml", '
            '"--storage.tsdb.path=/prometheus", "--web.listen-address=127.0.0.1:9090"]',
        ),
        # ~300 MB of time zone JSON that the web UI never loads.
        dpkg_excludes=("/usr/share/javascript/moment-timezone/data/unpacked/*",),
    ),
}


# ---------------------------------------------------------------------- host settings


def pip_conf(config_list: str) -> str:
    """A ``pip.conf`` for the image from the host's ``pip config list`` output.

    Keeps the index URLs that are http(s) (``file://`` and local paths such as
    ``/opt/wheels`` do not exist in a build) and the network settings; drops
    constraints and the like; points ``cert`` at the image's CA bundle, which
    holds every CA the host trusts. Environment entries (``:env:.``) win over
    file entries, as in pip.
    """
    conf: dict[str, str] = {}
    lines = sorted(config_list.splitlines(), key=lambda line: line.startswith(":env:"))
    for line in lines:
        m = re.match(r"^[^.]*\.([a-z0-9-]+)='(.*)'$", line)
        if not m:
            continue
        key = PIP_ALIASES.get(m.group(1), m.group(1))
        value = m.group(2)
        if key not in PIP_KEYS:
            continue
        if key in PIP_URL_KEYS:
            value = " ".join(v for v in value.split() if re.match(r"https?://", v))
            if not value:
                continue
        conf[key] = value
    conf["cert"] = str(HOST_BUNDLE)
    body = "".join(f"{k} = {v}\n" for k, v in sorted(conf.items()))
    return f"# made from the host's pip settings (tests/_docker_standin.py)\n[global]\n{body}"


def certificates(bundle: str) -> list[str]:
    """The PEM certificates of a CA bundle, each normalized to its BEGIN..END block."""
    return [
        m.group(0) + "\n"
        for m in re.finditer(
            r"-----BEGIN CERTIFICATE-----\n.*?\n-----END CERTIFICATE-----", bundle, re.S
        )
    ]


def missing_certificates(host_bundle: str, image_bundle: str) -> list[str]:
    """The certificates the host trusts that the image's bundle lacks, in host order."""
    have = set(certificates(image_bundle))
    return [c for c in certificates(host_bundle) if c not in have]


def apt_settings(conf_dir: Path) -> list[Path]:
    """The host's apt.conf.d files a build's apt needs too: acquire settings (a
    proxy, a snapshot mirror's Valid-Until) and the Docker image trimming ones."""
    wanted = re.compile(
        r"Acquire::(https?::)?(Proxy|Check-Valid-Until|Check-Date)|Acquire::https?\s*\{", re.I
    )
    out = []
    for f in sorted(conf_dir.glob("*")):
        if not f.is_file():
            continue
        if f.name.startswith("docker-") or wanted.search(f.read_text(errors="replace")):
            out.append(f)
    return out


# ---------------------------------------------------------------------- customize hooks


def customize_python(root: Path) -> None:
    """Make a Debian python3 root usable as ``python:3.11-slim`` here (module docstring)."""
    # (os.path.lexists: an absolute link in the chroot must not be followed on the host)
    (root / "usr/local/bin").mkdir(parents=True, exist_ok=True)
    for name, target in (("python", "python3"), ("pip", "pip3"), ("pip3", "pip3")):
        link = root / "usr/local/bin" / name
        if not os.path.lexists(link):
            link.symlink_to(f"/usr/bin/{target}")
    if not os.path.lexists(root / "usr/bin/python"):
        (root / "usr/bin/python").symlink_to("python3")
    for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()

    # Every CA the host trusts becomes a local CA of the image, so that it stays in
    # the bundle whatever a build does with ca-certificates later.
    image_bundle = (root / HOST_BUNDLE.relative_to("/")).read_text()
    local = root / "usr/local/share/ca-certificates"
    local.mkdir(parents=True, exist_ok=True)
    for n, cert in enumerate(missing_certificates(HOST_BUNDLE.read_text(), image_bundle)):
        (local / f"host-{n:03d}.crt").write_text(cert)
    subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True, capture_output=True)
    still = missing_certificates(
        HOST_BUNDLE.read_text(), (root / HOST_BUNDLE.relative_to("/")).read_text()
    )
    if still:
        sys.exit(f"{len(still)} CA(s) the host trusts are still missing from the image")

    pip_list = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    (root / "etc/pip.conf").write_text(pip_conf(pip_list))
    for f in apt_settings(Path("/etc/apt/apt.conf.d")):
        shutil.copy(f, root / "etc/apt/apt.conf.d" / f.name)
    _trim(root)


def customize_prometheus(root: Path) -> None:
    """A writable ``/prometheus`` for the ``prometheus`` user; no docs."""
    (root / "prometheus").mkdir(exist_ok=True)
    subprocess.run(
        ["chroot", str(root), "chown", "prometheus:prometheus", "/prometheus"], check=True
    )
    _trim(root)


def _trim(root: Path) -> None:
    for pattern in TRIM:
        for p in root.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


CUSTOMIZE: dict[str, Callable[[Path], None]] = {
    "python": customize_python,
    "prometheus": customize_prometheus,
}


# ---------------------------------------------------------------------- bootstrap


def debian_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise RuntimeError("/etc/os-release names no VERSION_CODENAME: not a Debian host?")


def apt_sources() -> Path:
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    return deb822 if deb822.exists() else Path("/etc/apt/sources.list")


def mmdebstrap_command(standin: StandIn, tarball: Path) -> list[str]:
    """The mmdebstrap command line that writes ``standin``'s root file system to ``tarball``."""
    hook = f'{sys.executable} -m tests._docker_standin customize {standin.kind} "$1"'
    return [
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        "--mode=root",
        "--format=tar",
        f"--include={','.join(standin.packages)}",
        # The host's mirror may be a snapshot: its Release files have expired.
        '--aptopt=Acquire::Check-Valid-Until "false"',
        '--aptopt=Acquire::Check-Date "false"',
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        *(f"--dpkgopt=path-exclude={p}" for p in standin.dpkg_excludes),
        # merged /usr set up by the hook, not by the usrmerge package (and its perl)
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        f"--customize-hook={hook}",
        debian_codename(),
        str(tarball),
        str(apt_sources()),
    ]


def bootstrap(
    standins: Sequence[StandIn], images: Path, log: Callable[[str], None], timeout: float = 600
) -> dict[str, Path]:
    """Bootstrap the root file systems that are not cached yet, side by side.

    Returns:
        ``{kind: tarball}`` for every stand-in.
    Raises:
        RuntimeError: mmdebstrap failed; its output is in ``images/<kind>.log``.
    """
    images.mkdir(parents=True, exist_ok=True)
    tarballs = {s.kind: images / f"{s.kind}.rootfs.tar" for s in standins}
    running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    try:
        for s in standins:
            if tarballs[s.kind].exists():
                continue
            tmp = images / f"tmp.{s.kind}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            partial = tmp / "rootfs.tar"
            log(f"mmdebstrap: {s.kind} stand-in from {' '.join(s.packages)}")
            with (images / f"{s.kind}.log").open("wb") as out:
                proc = subprocess.Popen(
                    mmdebstrap_command(s, partial),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    cwd=REPO,
                    env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)},
                )
            running[s.kind] = (proc, tmp)
        deadline = time.monotonic() + timeout
        for kind, (proc, tmp) in running.items():
            rc = proc.wait(max(1.0, deadline - time.monotonic()))
            if rc != 0:
                log_tail = (images / f"{kind}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"mmdebstrap ({kind}) exited with {rc}:\n{log_tail}")
            (tmp / "rootfs.tar").rename(tarballs[kind])
    finally:
        for proc, tmp in running.values():
            if proc.poll() is None:  # interrupted: let mmdebstrap unmount its chroot first
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
                proc.kill()
            _unmount_below(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    return tarballs


def _unmount_below(path: Path) -> None:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(f"{path}/")]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mmdebstrap customize hooks of the stand-ins")
    sub = parser.add_subparsers(dest="command", required=True)
    customize = sub.add_parser("customize")
    customize.add_argument("kind", choices=sorted(CUSTOMIZE))
    customize.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    CUSTOMIZE[args.kind](args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
