"""The project as a user installs it: setup.cfg lists every package on disk, and the wheel,
installed outside the source tree, imports every module and runs the commands."""

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_imports import modules

ROOT = Path(__file__).resolve().parent.parent


def listed_packages() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}


def test_setup_cfg_lists_every_package():
    on_disk = {".".join(("refgpt", *p.parent.relative_to(ROOT / "refgpt").parts))
               for p in (ROOT / "refgpt").rglob("__init__.py")}
    assert listed_packages() == on_disk | {"refgpt.kernels"}


def test_the_wheel_imports_every_module_outside_the_source_tree(tmp_path):
    src = tmp_path / "src"                   # a copy: building writes build/ and *.egg-info
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    for folder in ("refgpt", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("refgpt-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    names = [n for n in modules() if "cupy" not in n]       # those need a GPU's CuPy
    script = ("import importlib, sys\n"
              f"site = {str(site)!r}\n"
              f"for name in {names!r}:\n"
              "    m = importlib.import_module(name)\n"
              "    assert m.__file__.startswith(site), (name, m.__file__)\n"
              "print('imported', len(sys.modules))\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "refgpt.study.scaling", "--help"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "dp-shm" in r.stdout, r.stderr
