"""The container image the stages run in: one tag shared by `make image` and the rendered Jobs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from jobs import __version__

REGISTRY = os.environ.get("VLMJOBS_REGISTRY", "ghcr.io/vlmjobs")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def revision() -> str:
    """The git revision the image is built from: $VLMJOBS_REVISION, else this checkout's HEAD."""
    if os.environ.get("VLMJOBS_REVISION"):
        return os.environ["VLMJOBS_REVISION"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def uncommitted(root: Path | None = None) -> bool:
    """Whether the checkout has changes no commit holds (tracked or untracked files that git does not ignore): an
    image tagged with HEAD's revision was not built from them. False where there is no git to ask."""
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root or PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return bool(status.strip())


def image_tag() -> str:
    return f"{__version__}-{revision()}"


def default_image(registry: str = REGISTRY) -> str:
    return f"{registry}/vlmjobs:{image_tag()}"
