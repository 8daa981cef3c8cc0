"""The README's install from a clone, on a fresh environment: the wheel that ``pip install .``
builds is built here, installed into a new virtual environment (which holds nothing else), and
imported from there, away from the checkout, to run a README block and reach every module."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

#: Packaging runs on the host, whatever device the tests use.
pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import importlib, pathlib, pkgutil, sys
import cct_loss
here = pathlib.Path(cct_loss.__file__).resolve()
assert here.is_relative_to(pathlib.Path(sys.prefix).resolve()), here
names = [m.name for m in pkgutil.walk_packages(cct_loss.__path__, "cct_loss.")]
for name in names:
    if not name.endswith(("triton_kernels", "triton_tiles")):  # need triton, an extra
        importlib.import_module(name)
assert (here.parent / "py.typed").exists()
print("modules", len(names))
"""


def test_the_wheel_of_pip_install_dot_installs_into_a_fresh_environment(tmp_path: Path) -> None:
    dist, env = tmp_path / "dist", tmp_path / "env"
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "--wheel-dir", str(dist), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("cct_loss-*-py3-none-any.whl")
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    subprocess.run([*install, "--no-deps", "--no-index", str(wheel)], check=True, cwd=tmp_path)
    # torch from this environment (a copy of it would be a gigabyte): its site-packages on the
    # path after the new environment's own, where the wheel's cct_loss comes first.
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "torch_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def run(code: str) -> str:
        out = subprocess.run(
            [str(python), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path
        )
        return out.stdout

    assert run(CHECK).startswith("modules")
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```python\n(.*?)```", readme, re.DOTALL)
    assert first is not None
    printed = run(first.group(1)).splitlines()
    shown = re.findall(r"print\(.*\)\s+#\s?(.*)", first.group(1))
    assert printed == shown
