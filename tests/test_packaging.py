"""The built wheel holds every package, with the top-level callbacks/ folder as ``gazeguard.callbacks``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.cfg", "README.md", "gazeguard", "callbacks")


def package_dirs() -> set[str]:
    """Every package of the source tree, as the wheel names its folder."""
    dirs = set()
    for root, installed in (("gazeguard", "gazeguard"), ("callbacks", "gazeguard/callbacks")):
        for init in (REPO / root).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / root).as_posix()
            dirs.add(installed if relative == "." else f"{installed}/{relative}")
    return dirs


def test_the_wheel_packages_the_callbacks_under_their_import_path(tmp_path: Path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gazeguard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"{d}/__init__.py" for d in package_dirs()} <= names  # every package, listed in pyproject.toml
    assert {"gazeguard/callbacks/defense.py", "gazeguard/callbacks/securegaze.py",
            "gazeguard/callbacks/backdoor_metrics.py"} <= names
    assert not [n for n in names if n.startswith("callbacks/") or n.startswith("tests/")]
    assert "gazeguard/defenses/securegaze/calibrations/synthetic_cpu.json" in names  # SecureGaze's default threshold

    # installed from the wheel alone (not this checkout), the callbacks import under their path
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import gazeguard.callbacks as c, gazeguard; print(c.__file__); print(gazeguard.__file__); "
            "c.SecureGaze()")  # builds SecureGaze, which reads its shipped calibration
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    callbacks_file, package_file = done.stdout.split()
    assert callbacks_file == str(target / "gazeguard" / "callbacks" / "__init__.py")
    assert package_file == str(target / "gazeguard" / "__init__.py")
