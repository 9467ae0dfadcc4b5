"""Build momoe._C against the installed torch (use `pip install --no-build-isolation`).

CPU kernels are always built. CUDA sources (csrc/**/*.cu and the *_cuda.cpp glue) are built
only when torch has CUDA and nvcc is found; MOMOE_FORCE_CPU=1 skips them. CUDA architectures
come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), never from the local GPU, so a wheel
built on a CPU machine runs on GPUs.
"""
import glob
import importlib.util
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def build_cuda() -> bool:
    if os.environ.get("MOMOE_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def cutlass_include_dirs() -> list:
    """Headers of the `nvidia-cutlass` wheel (not vendored); empty when it is not installed. The package is
    located, not imported: its Python side needs dependencies (cuda-python, scipy) the headers do not."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = spec.submodule_search_locations[0]
    candidates = [os.path.join(root, "source", "include"), os.path.join(root, "source", "tools", "util", "include")]
    return [c for c in candidates if os.path.isdir(c)]


def cuda_arch_defines(arch_list: str) -> list:
    """-D flags for nvcc from TORCH_CUDA_ARCH_LIST: the sm_90a grouped GEMM kernels (CUTLASS 3, TMA and
    wgmma) are built only when the list targets 9.0a; without it Hopper GPUs run the sm80 kernels."""
    archs = {a.strip().replace("+PTX", "") for a in arch_list.replace(";", " ").split()}
    return ["-DMOMOE_CUDA_SM90A=1"] if "9.0a" in archs else []


def extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/*/*_cpu*.cpp"))
    # -fopenmp: ATen's at::parallel_for is an inline OpenMP loop, serial unless the extension itself
    # is compiled with OpenMP (the torch wheel ships the libgomp it links against).
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.abspath("csrc")]
    if not build_cuda():
        return CppExtension(
            "momoe._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    cutlass = cutlass_include_dirs()
    if not cutlass:
        raise RuntimeError(
            "momoe: the CUDA build needs the CUTLASS headers of the nvidia-cutlass wheel: "
            "pip install 'nvidia-cutlass>=4.2' (or MOMOE_FORCE_CPU=1 for a CPU-only build)"
        )
    sources += sorted(glob.glob("csrc/*/*_cuda.cpp")) + sorted(glob.glob("csrc/*/*.cu"))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-std=c++17"]
    nvcc_flags += cuda_arch_defines(os.environ["TORCH_CUDA_ARCH_LIST"])
    return CUDAExtension(
        "momoe._C",
        sources,
        include_dirs=include_dirs + cutlass,
        define_macros=[("MOMOE_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


def torch_requirement() -> str:
    """The extension links against this torch's C++ ABI, so the wheel needs the same release."""
    return "torch==" + torch.__version__.split("+")[0]


# The zoo cards live in the repository-root models/ folder (one JSON per model, see models/); the wheel
# ships them as package data of momoe.models.cards, where momoe.models.registry looks first. From a
# source tree (editable install) the registry reads models/ directly, so the JSON files exist once in git.
CARDS_PACKAGE = "momoe.models.cards"

setup(
    packages=find_packages(include=["momoe", "momoe.*"]) + [CARDS_PACKAGE],
    package_dir={CARDS_PACKAGE: "models"},
    package_data={CARDS_PACKAGE: ["*.json"], "momoe.data": ["builtin/*/*"]},  # + the embedded dataset
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[torch_requirement(), "safetensors>=0.4", "numpy", "tqdm"],
)
