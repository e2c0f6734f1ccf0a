"""Builds the C programs of bench/experiments/ with the system compiler, once per source change."""

from __future__ import annotations

import os
import subprocess


def build(source: str, out_dir: str, flags: tuple[str, ...]) -> tuple[str | None, str]:
    """Compiles `source` into out_dir (again only when the source is newer than the binary).
    Returns (path to the binary, "") or (None, why it could not be built)."""
    exe = os.path.join(out_dir, os.path.splitext(os.path.basename(source))[0])
    if os.path.exists(exe) and os.path.getmtime(exe) >= os.path.getmtime(source):
        return exe, ""
    os.makedirs(out_dir, exist_ok=True)
    cmd = [os.environ.get("CC", "cc"), *flags, source, "-o", exe]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{cmd[0]} failed: {exc}"
    if done.returncode != 0:
        return None, f"{' '.join(cmd)}: {done.stderr.strip()[:200]}"
    return exe, ""
