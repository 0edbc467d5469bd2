"""Build script: the Python package plus two extension modules, via torch.utils.cpp_extension.

* ``epcomm._C`` (g++, always built): the cpu device runtime (POSIX shared memory) with the SIMT
  layer, so kernels run on the CPU.
* ``epcomm._C_cuda`` (nvcc, sm_90 + sm_100, PTX for newer): the cuda device runtime; built whenever nvcc is found.
  ``EPCOMM_BUILD_CUDA=0`` skips it, ``EPCOMM_BUILD_CUDA=1`` makes a missing nvcc an error. With NCCL's
  headers (the ``nvidia-nccl`` wheel torch depends on, or ``NCCL_HOME``) it also carries the internode
  kernels over NCCL GIN and links ``libnccl.so.2``; without them it is built for one node only, and
  across nodes the backend says what is missing.

Install with ``pip install --no-build-isolation -e .`` (an isolated build environment has no
torch). CUDA_HOME is found from nvcc even when the nvcc on PATH is a wrapper script, and ninja
(requirements-dev.txt) is found in this interpreter's environment; MAX_JOBS defaults to 2.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _cuda_home_from_nvcc() -> str | None:
    """The CUDA toolkit root, from CUDA_HOME or from the nvcc on PATH (following a wrapper script)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(os.path.realpath(nvcc))
    head = real.read_bytes()[:4096]
    if head.startswith(b"#!"):  # a wrapper: `exec /path/to/toolkit/bin/nvcc "$@"`
        match = re.search(rb"(/[^\s'\"]+/bin/nvcc)\b", head)
        if match is None:
            return None
        real = Path(os.path.realpath(match.group(1).decode()))
    home = real.parent.parent
    return str(home) if (home / "include" / "cuda_runtime.h").exists() else None


def _nccl_home() -> Path | None:
    """NCCL's root (include/nccl_device.h, lib/libnccl.so.2): NCCL_HOME, else the nvidia-nccl wheel."""
    candidates = [os.environ["NCCL_HOME"]] if os.environ.get("NCCL_HOME") else []
    try:
        import nvidia.nccl  # torch's dependency (nvidia-nccl-cu13); a namespace package: no __file__

        candidates += list(nvidia.nccl.__path__)
    except ImportError:
        pass
    for home in map(Path, candidates):
        if (home / "include" / "nccl_device.h").exists() and (home / "lib" / "libnccl.so.2").exists():
            return home
    return None


def _extensions() -> tuple[list, dict]:
    cuda_home = _cuda_home_from_nvcc()
    want_cuda = os.environ.get("EPCOMM_BUILD_CUDA", "auto")
    if want_cuda == "1" and cuda_home is None:
        sys.exit("EPCOMM_BUILD_CUDA=1 but no CUDA toolkit was found (no nvcc on PATH, CUDA_HOME unset)")
    build_cuda = cuda_home is not None and want_cuda != "0"
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", "2")
    # ninja from requirements-dev.txt lives next to this interpreter; torch looks for it on PATH.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    common = ["-std=c++20", "-O2", "-Wall", "-Wno-unused-function"]
    runtime = "csrc/runtime"
    extensions = [
        CppExtension(
            "epcomm._C",
            sources=[
                "csrc/bindings/bindings.cpp", f"{runtime}/device_runtime.cpp", f"{runtime}/cpu_runtime.cpp",
                f"{runtime}/cpu_entries.cpp", "csrc/kernels/intranode_launch_simt.cpp",
                "csrc/kernels/internode_launch_simt.cpp",
                "csrc/kernels/low_latency_launch_simt.cpp",
            ],
            include_dirs=[str(CSRC)],
            extra_compile_args=[*common, "-pthread", "-DEPCOMM_WITH_CPU_RUNTIME=1"],
            extra_link_args=["-pthread", "-lrt"],
        )
    ]
    if build_cuda:
        lib64 = str(Path(cuda_home) / "lib64")
        sources = ["csrc/bindings/bindings.cpp", f"{runtime}/device_runtime.cpp", f"{runtime}/cuda_runtime.cu",
                   f"{runtime}/cuda_entries.cu", "csrc/kernels/intranode_launch.cu",
                   f"{runtime}/cuda_low_latency_entries.cu", "csrc/kernels/low_latency_launch.cu"]
        include_dirs, link_args = [str(CSRC)], [f"-Wl,-rpath,{lib64}"]
        nccl = _nccl_home()
        if nccl is not None:
            # across nodes: the internode kernels over NCCL GIN, and the LL kernels over GIN for every peer (their
            # entries register themselves), the
            # network set-up, and libnccl.so.2 (the wheel ships only the versioned name; rpath to it)
            sources += [f"{runtime}/gin_network.cu", f"{runtime}/gin_setup.cu", f"{runtime}/gin_entries.cu",
                        "csrc/kernels/internode_launch_gin.cu", f"{runtime}/gin_low_latency_entries.cu",
                        "csrc/kernels/low_latency_launch_gin.cu"]
            include_dirs.append(str(nccl / "include"))
            link_args += [f"-L{nccl / 'lib'}", "-l:libnccl.so.2", f"-Wl,-rpath,{nccl / 'lib'}"]
        else:
            print("epcomm: NCCL's headers not found (no nvidia-nccl wheel, NCCL_HOME unset): epcomm._C_cuda is built "
                  "without the internode kernels; across nodes backend='cuda' will say so", file=sys.stderr)
            sources.append(f"{runtime}/gin_network_absent.cpp")
        extensions.append(
            CUDAExtension(
                "epcomm._C_cuda",
                sources=sources,
                include_dirs=include_dirs,
                extra_compile_args={
                    "cxx": [*common, "-DEPCOMM_WITH_CUDA_RUNTIME=1"],
                    # our own -gencode replaces torch's arch flags: sm_90 (H100/H200), sm_100 (B200/GB200),
                    # and compute_100 PTX that newer GPUs JIT-compile (csrc check: both targets spill-free)
                    "nvcc": ["-std=c++20", "-O2", "-gencode=arch=compute_90,code=sm_90",
                             "-gencode=arch=compute_100,code=sm_100", "-gencode=arch=compute_100,code=compute_100"],
                },
                extra_link_args=link_args,
            )
        )
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
