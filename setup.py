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
    # libstdc++ is linked as a shared library, the one torch uses: a toolchain that links it statically
    # by default (-static-libstdc++ in a g++ wrapper, as on one GPU machine's image) gives the extension
    # its own copy, whose streams cannot format a number -- an error message with one crashed there.
    # The explicit -lstdc++ comes before the driver's own, so the shared library serves every symbol.
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args={"cxx": cxx},
                  extra_link_args=["-Wl,-Bdynamic", "-lstdc++"], py_limited_api=False)
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # -Xptxas=-v prints each kernel's registers, shared memory, stack frame and spills in the build log.
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++20", "-lineinfo", "-Xptxas=-v"]
        ext = cpp_extension.CUDAExtension("fused_resnet._C", sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("fused_resnet._C", sources, **kwargs)
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
