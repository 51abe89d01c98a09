"""Find, build and register the compiled `respin` kernel library (kernels/, DESIGN §6).

The library is `runtime_ops/_lib/librespin_ops.so`, built by `build()` (or `python -m
runtime_ops.build`); the environment variable RESPIN_OPS_LIBRARY points at another build. Nothing
here runs at import time and onnxruntime is imported only by `session_options`. Models that use
the custom ops still run without the library: their ONNX function bodies stand in for the kernels.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_VAR = "RESPIN_OPS_LIBRARY"
LIBRARY_NAME = "librespin_ops.so"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
KERNELS_DIR = REPO_DIR / "kernels"
BUILD_DIR = REPO_DIR / "build" / "kernels"
INSTALLED = PACKAGE_DIR / "_lib" / LIBRARY_NAME
BUILD_COMMAND = "python -m runtime_ops.build"


def library_path() -> Path:
    """The kernel library to load: $RESPIN_OPS_LIBRARY if set, else the built `_lib/librespin_ops.so`.

    Raises FileNotFoundError saying how to build it when it is absent.
    """
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={override} is not a file: point it at a built {LIBRARY_NAME} "
                                    f"or unset it to use {INSTALLED}")
        return path
    if not INSTALLED.is_file():
        raise FileNotFoundError(f"the respin kernel library is not built ({INSTALLED} is missing): run "
                                f"`{BUILD_COMMAND}` (needs cmake, g++ and apt-get for the onnxruntime headers)")
    return INSTALLED


def available() -> bool:
    """Whether `library_path()` finds a library."""
    try:
        library_path()
    except FileNotFoundError:
        return False
    return True


def _run(cmd: list[str], what: str, verbose: bool) -> str:
    """Run `cmd`; on failure raise RuntimeError with `what` and the command's last error line."""
    logger.debug("running %s", " ".join(cmd))
    result = subprocess.run(cmd, cwd=REPO_DIR, text=True, capture_output=not verbose)
    if result.returncode != 0:
        output = (result.stderr or "") + (result.stdout or "")
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()] or lines
        detail = errors[0] if errors else f"exit code {result.returncode}"
        raise RuntimeError(f"{what} failed: {detail}")
    return result.stdout or ""


def _require_tools(headers_present: bool) -> None:
    missing = [] if shutil.which("cmake") else ["cmake"]
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        missing.append("a C++ compiler (g++)")
    if not headers_present:  # fetch_ort_headers.sh needs them
        missing += [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"cannot build the respin kernel library: missing {', '.join(missing)}")


def build(verbose: bool = False) -> Path:
    """Fetch the onnxruntime headers if needed, configure and build kernels/ into build/kernels/ and
    install the library as runtime_ops/_lib/librespin_ops.so (incremental: unchanged sources only
    re-link nothing). The CUDA kernels are built where nvcc is found ($RESPIN_CUDA=ON requires them,
    OFF skips them). Returns the installed path; RuntimeError with one line naming what failed.
    """
    include_dir = BUILD_DIR / "ort" / "usr" / "include" / "onnxruntime"
    _require_tools(headers_present=(include_dir / "onnxruntime_lite_custom_op.h").is_file())
    fetched = _run(["bash", str(KERNELS_DIR / "fetch_ort_headers.sh"), str(BUILD_DIR / "ort")],
                   "fetching the onnxruntime headers (kernels/fetch_ort_headers.sh)", verbose=False)
    include_dir = Path(fetched.strip().splitlines()[-1])
    # RESPIN_CUDA=ON|OFF|AUTO (environment): whether the CUDA kernels must, must not or may be built
    cuda = os.environ.get("RESPIN_CUDA", "AUTO").upper()
    if cuda not in ("ON", "OFF", "AUTO"):
        raise RuntimeError(f"RESPIN_CUDA must be ON, OFF or AUTO, got {cuda!r}")
    _run(["cmake", "-S", str(KERNELS_DIR), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release",
          f"-DORT_INCLUDE_DIR={include_dir}", f"-DRESPIN_CUDA={cuda}"], "configuring kernels/ (cmake)", verbose)
    _run(["cmake", "--build", str(BUILD_DIR), "--parallel", str(os.cpu_count() or 1)],
         "building kernels/ (cmake --build)", verbose)
    built = BUILD_DIR / LIBRARY_NAME
    if not built.is_file():
        raise RuntimeError(f"building kernels/ produced no {built}")
    INSTALLED.parent.mkdir(parents=True, exist_ok=True)
    if not INSTALLED.is_file() or INSTALLED.read_bytes() != built.read_bytes():
        # a new file renamed into place: a process that has the old one loaded keeps its copy
        with tempfile.NamedTemporaryFile(dir=INSTALLED.parent, prefix=".librespin_ops.", delete=False) as tmp:
            tmp.write(built.read_bytes())
        os.chmod(tmp.name, 0o755)
        os.replace(tmp.name, INSTALLED)
        logger.info("installed %s", INSTALLED)
    return INSTALLED


def session_options(use_kernels: bool = True, threads: int | None = None):
    """`onnxruntime.SessionOptions` with the kernel library registered (when `use_kernels`) and
    `threads` intra-op threads (None: onnxruntime's default, all cores). The kernels run on that
    intra-op thread pool. FileNotFoundError (see `library_path`) when the library is not built.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    if use_kernels:
        options.register_custom_ops_library(str(library_path()))
    return options
