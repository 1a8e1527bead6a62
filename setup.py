"""Builds the meshpost Python package: the _meshpost extension through the project's CMake
(Ninja, build dir build-py/), the `meshpost` package and the top-level `fserver_lib`.

    /usr/bin/python3 -m venv --system-site-packages .venv
    .venv/bin/pip install --no-build-isolation .

Offline by design: pybind11 and libtorch come from Debian (scripts/install_deps.sh).
MESHPOST_BUILD_JOBS sets the build parallelism (default 2).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_DIR = ROOT / "build-py"
BUILD_DIR.mkdir(exist_ok=True)  # egg_info writes here before any build step runs


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = BUILD_DIR / "pkg" / "meshpost"
        # Build against the torch this interpreter imports (Debian's 1.13, or a user's pip
        # torch 2.x), not whichever TorchConfig.cmake CMake would find first.
        import torch.utils
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(BUILD_DIR), "-G", "Ninja",
            "-DMESHPOST_BUILD_PYTHON=ON", "-DMESHPOST_BUILD_TESTS=OFF",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('MESHPOST_BUILD_TYPE', 'RelWithDebInfo')}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DMESHPOST_PYTHON_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ]
        if os.environ.get("MESHPOST_WITH_CUDA"):
            configure.append(f"-DMESHPOST_WITH_CUDA={os.environ['MESHPOST_WITH_CUDA']}")
        subprocess.check_call(configure)
        jobs = os.environ.get("MESHPOST_BUILD_JOBS", "2")
        subprocess.check_call(["cmake", "--build", str(BUILD_DIR), "--target", "_meshpost",
                               "-j", jobs])
        built = sorted(out_dir.glob("_meshpost*.so"))
        if not built:
            raise RuntimeError(f"CMake did not produce _meshpost*.so in {out_dir}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[-1], target)


setup(
    name="meshpost",
    version="0.1.0",
    description="Push/pull communication for attention-FFN disaggregated MoE models",
    python_requires=">=3.9",
    package_dir={"": "bindings/python"},
    packages=["meshpost"],
    py_modules=["fserver_lib"],
    ext_modules=[CMakeExtension("meshpost._meshpost")],
    cmdclass={"build_ext": CMakeBuild},
    # setuptools' default build/ is the C++ build directory; keep out of it.
    options={"build": {"build_base": str(BUILD_DIR / "setuptools")},
             "egg_info": {"egg_base": str(BUILD_DIR)}},
    zip_safe=False,
)
