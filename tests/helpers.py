"""What tests share beyond the package: the repository root, and installing the Debian packages
a test needs (Slurm, Chromium). Launchers are `hpctrain.local_launch`, synthetic gradients
`hpctrain.compression.synthetic`."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def apt_install(packages: list[str], present: Callable[[], bool]) -> str | None:
    """`apt-get install` `packages` unless `present()`; returns why not when it cannot."""
    if present():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"needs {' '.join(packages)}; install with apt as root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not present():
        return f"`{' '.join(install)}` failed: {proc.stderr.strip()[-300:]}"
    return None
