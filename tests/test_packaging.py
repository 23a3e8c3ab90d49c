"""The built wheel works on its own: `pip wheel .`, installed (not editable) into a temporary
target, imports, reports the version from pyproject.toml and runs `dynlora-transform --help`.

Offline and quick: no build isolation (the setuptools this environment has builds it) and no
dependencies (they are this environment's own). Everything runs from a directory outside the
repository, so the source tree cannot stand in for the installed package.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _setuptools_can_build() -> bool:
    # pyproject.toml's build-system asks for setuptools>=68; older ones cannot build it without isolation
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools
    return int(setuptools.__version__.split(".")[0]) >= 68


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    dist, target, source = tmp / "dist", tmp / "target", tmp / "source"
    # a copy of what the build reads: pip builds in the source tree and would leave build/ in the repository
    shutil.copytree(ROOT / "dynlora_fx", source / "dynlora_fx", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    # with isolation pip fetches setuptools first (from the index), so only where this one cannot build
    isolation = ["--no-build-isolation"] if _setuptools_can_build() else []
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dist),
                            str(source)], capture_output=True, text=True, cwd=tmp, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = list(dist.glob("dynlora_fx-*.whl"))
    assert len(wheels) == 1, wheels
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
                              "--target", str(target), str(wheels[0])], capture_output=True, text=True, cwd=tmp,
                             timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    return wheels[0], target, env, tmp


def test_wheel_has_the_package_and_its_entry_point(installed):
    wheel, target, _, _ = installed
    assert wheel.name.startswith(f"dynlora_fx-{PROJECT['version']}-py3-none-any")
    assert (target / "dynlora_fx" / "passes" / "regions.py").is_file()
    assert (target / "dynlora_fx" / "runtime" / "switcher.py").is_file()
    assert (target / "bin" / "dynlora-transform").is_file()


def test_installed_wheel_imports_with_version_from_metadata(installed):
    _, target, env, tmp = installed
    code = ("import dynlora_fx as dl, importlib.metadata as md; "
            "print(dl.__file__); print(dl.__version__); print(md.version('dynlora-fx'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, version, metadata = proc.stdout.split()
    assert Path(where).is_relative_to(target)  # the wheel's copy, not the source tree
    assert version == metadata == PROJECT["version"]


def test_installed_cli_runs(installed):
    _, target, env, tmp = installed
    script = target / "bin" / "dynlora-transform"
    # the script's shebang is this interpreter; run it through the interpreter all the same so a
    # long venv path (shebangs are capped at 127 bytes on Linux) does not matter
    for argv, expect in ((["--help"], "usage: dynlora-transform"), (["--version"], PROJECT["version"])):
        proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env, cwd=tmp,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert expect in proc.stdout, proc.stdout
