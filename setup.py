"""Build hook: ship the top-level templates/, site_profiles/ and env/ inside the wheel.

They live at the repository's top level (where people edit them) and are copied into
`xmoectl/_bundled/` of the built package, where `xmoectl.resource_dir` finds them after a
plain `pip install .`. Everything else about the package is declared in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RESOURCES = ("templates", "site_profiles", "env")


class BuildPyWithResources(build_py):
    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        target = Path(self.build_lib) / "xmoectl" / "_bundled"
        for name in RESOURCES:
            if (root / name).is_dir():
                shutil.rmtree(target / name, ignore_errors=True)
                shutil.copytree(root / name, target / name)


setup(cmdclass={"build_py": BuildPyWithResources})
