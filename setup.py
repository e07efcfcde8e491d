"""Builds fused_resnet and its compiled extension, fused_resnet._C.

The CPU kernels are always built. The CUDA kernels are built when a CUDA toolkit (nvcc) and a CUDA build
of torch are present -- no GPU is needed -- or when FORCE_CUDA=1. Switches:

  FUSED_RESNET_NO_EXTENSION=1   build no extension at all (the package still works: torch/Triton backends)
  FUSED_RESNET_NO_CUDA=1        build the CPU part only
  FORCE_CUDA=1                  build the CUDA part even where torch cannot see a toolkit
  TORCH_CUDA_ARCH_LIST="8.0;9.0" GPU architectures, one -gencode each (default: sm_80 and sm_90)
  MAX_JOBS=N                    parallel compile jobs (ninja)
  CUDA_HOME=/path/to/cuda       the toolkit root, when the nvcc on PATH is a wrapper elsewhere
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def _guess_cuda_home() -> None:
    """torch guesses the toolkit root from `which nvcc`; when that nvcc is a wrapper script (no
    lib64/libcudart beside it), follow the script to the real toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            candidates += [os.path.dirname(os.path.dirname(word)) for word in head.split()
                           if word.endswith("/bin/nvcc")]
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if glob.glob(os.path.join(root, "lib64", "libcudart*")) or glob.glob(
                os.path.join(root, "targets", "*", "lib", "libcudart*")):
            os.environ["CUDA_HOME"] = root
            return


def libstdcxx_link_args() -> list[str]:
    """Link arguments that make libstdc++ a shared-library dependency of the extension: the very file this
    process (torch imported) has loaded, by path, else the soname; never ``-lstdc++``.

    A toolchain that links libstdc++ statically by default gives the extension its own copy, whose streams
    could not format a number: an error message with one crashed the process on the GPU machine's image
    (its g++ in /opt/gcc). There ``-lstdc++`` found an archive before any shared library of that name --
    the system keeps only ``libstdc++.so.6``, and the unversioned ``libstdc++.so`` lives in the compiler's
    own directory -- so it linked statically all the same. A path, or ``-l:libstdc++.so.6``, names the
    shared library itself; --no-as-needed keeps the dependency recorded."""
    if not sys.platform.startswith("linux"):
        return []
    lib = "-l:libstdc++.so.6"
    try:
        with open("/proc/self/maps") as f:
            loaded = [line.split()[-1] for line in f if "/libstdc++.so" in line]
        if loaded and os.path.isfile(loaded[0]):
            lib = loaded[0]
    except OSError:
        pass
    return ["-Wl,--push-state,--no-as-needed", lib, "-Wl,--pop-state"]


def extensions():
    if _env_flag("FUSED_RESNET_NO_EXTENSION"):
        return [], {}
    _guess_cuda_home()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    import torch
    from torch.utils import cpp_extension

    with_cuda = not _env_flag("FUSED_RESNET_NO_CUDA") and (
        _env_flag("FORCE_CUDA") or (cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None))
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fdiagnostics-color=always"]
    # libstdc++ as the shared library torch uses, ahead of any static copy the compiler driver adds
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args={"cxx": cxx},
                  extra_link_args=libstdcxx_link_args(), py_limited_api=False)
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # -Xptxas=-v prints each kernel's registers, shared memory, stack frame and spills in the build log.
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++20", "-lineinfo", "-Xptxas=-v"]
        ext = cpp_extension.CUDAExtension("fused_resnet._C", sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("fused_resnet._C", sources, **kwargs)
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


if __name__ == "__main__":  # setuptools runs this file as __main__ (pip's build too); tests import it
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
