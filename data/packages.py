"""Debian packages of the built-in datasets (Fashion-MNIST, the emoji font and Unicode's emoji list),
installed with apt when they are missing and this process may."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys


def install_packages(packages: list[str], what: str) -> bool:
    """apt-get install Debian packages, as root or through `sudo -n` (apt-get update only when the first
    try fails); True if it worked. Prints one line saying what is installed and why."""
    if shutil.which("apt-get") is None:
        return False
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and (shutil.which("sudo") is None
                 or subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0):
        return False
    print(f"{what} is missing: installing the Debian package{'s' * (len(packages) > 1)} {' '.join(packages)}",
          file=sys.stderr)
    install = [*sudo, "apt-get", "install", "-y", "-q", *packages]
    for command in (install, [*sudo, "apt-get", "update", "-q"], install):
        done = subprocess.run(command, capture_output=True, text=True)
        if command is install and done.returncode == 0:
            return True
    return False
