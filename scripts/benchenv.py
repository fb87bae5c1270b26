"""What every benchmark prints about the machine it ran on (docs/PERFORMANCE.md): the CPU model and the
flags that decide which kernels run (AMX, AVX512-BF16, AVX512-VNNI, AVX-512, AVX2), each BLAS library
loaded with the kernel it runs (threadpoolctl), FAISS's SIMD level, whether ``OPENBLAS_CORETYPE`` /
``OPENBLAS_L2_SIZE`` were set, the oneDNN ISA cap (``ONEDNN_MAX_CPU_ISA``) and the precision
``--precision auto`` picks here, with warnings when any of these makes timings unrepresentative.

A benchmark calls :func:`reexec_without_blas_env` first thing, before numpy loads OpenBLAS: it
starts the script again without the OpenBLAS variables (its own process only, never tests or CI;
``--keep-blas-env`` keeps them).
"""
from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

#: Environment variables that override OpenBLAS's choice of kernel and cache size for the CPU
#: (OpenBLAS README, "Setting the number of threads using environment variables" and
#: "Runtime CPU detection"): a value left over from another machine slows the Flat baseline.
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: Set in the re-executed process: the JSON of the BLAS_ENV values the first one was started with.
_UNSET_MARK = "LOOKALIKE_BENCH_UNSET_BLAS_ENV"


def reexec_without_blas_env(script: str) -> None:
    """Start this script again without :data:`BLAS_ENV` when any is set (OpenBLAS reads them once,
    when numpy or faiss loads it, so they cannot be dropped later in the same process)."""
    if "--keep-blas-env" in sys.argv or _UNSET_MARK in os.environ:
        return
    found = {k: os.environ[k] for k in BLAS_ENV if k in os.environ}
    if found:
        env = {k: v for k, v in os.environ.items() if k not in BLAS_ENV}
        env[_UNSET_MARK] = json.dumps(found)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, os.path.abspath(script), *sys.argv[1:]], env)

#: CPU flags (/proc/cpuinfo names) that decide which kernels BLAS, FAISS and PyTorch can use.
CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2", "fma")
#: OpenBLAS kernels (threadpoolctl's ``architecture``) without AVX2: on a CPU with AVX2 one of
#: them means OpenBLAS did not recognise the CPU (or was told otherwise) and sgemm runs far
#: below the CPU's speed (OpenBLAS's TargetList.txt).
PRE_AVX2_KERNELS = {"prescott", "core2", "penryn", "dunnington", "nehalem", "sandybridge", "atom", "katmai",
                    "coppermine", "northwood", "banias", "opteron", "opteron_sse3", "barcelona", "bobcat",
                    "bulldozer", "piledriver", "generic"}


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def blas_libraries() -> list[dict]:
    """The BLAS libraries loaded in this process, with the kernel each runs (threadpoolctl), each
    named by who loaded it ("numpy", "faiss" or the file name)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"library": "unknown", "error": "threadpoolctl is not installed (pip install threadpoolctl)"}]
    found = []
    for lib in threadpool_info():
        if lib.get("user_api") != "blas":
            continue
        path = lib.get("filepath", "")
        owner = "faiss" if "faiss" in path else "numpy" if "numpy" in path else Path(path).name
        found.append({"library": owner, "internal_api": lib.get("internal_api"), "version": lib.get("version"),
                      "architecture": lib.get("architecture"), "threads": lib.get("num_threads"), "path": path})
    return found


def faiss_simd_level() -> str:
    import faiss

    config = getattr(faiss, "SIMDConfig", None)
    if config is not None and hasattr(config, "get_level_name"):
        return config.get_level_name()
    return faiss.get_compile_options()


def blas_environment() -> dict:
    """Per :data:`BLAS_ENV` variable: ``{"was": value or None, "now": value or None}``."""
    unset = json.loads(os.environ.get(_UNSET_MARK, "{}"))
    return {k: {"was": unset.get(k, os.environ.get(k)), "now": os.environ.get(k)} for k in BLAS_ENV}


def model_runtime() -> dict:
    """The oneDNN ISA cap and what ``--precision auto`` picks on this CPU (indexer.model.resolve_precision)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from indexer.model import cpu_has_amx, cpu_has_vnni, int8_available, resolve_precision

    return {"onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "amx_usable": cpu_has_amx(),
            "vnni_usable": cpu_has_vnni(), "int8_available": int8_available(),
            "auto_precision_cpu": resolve_precision("auto", torch.device("cpu"), "auto"),
            "torch_version": torch.__version__}


SLOW_FAISS_BLAS = "batched Flat search (sgemm) is slower than the CPU allows, so speed-ups over Flat are overstated"
SLOW_BLAS = "its matrix products are slower than the CPU allows"


def machine(with_model_runtime: bool = False) -> dict:
    """The machine's description (see the module docstring); ``with_model_runtime`` adds :func:`model_runtime`."""
    import faiss
    import numpy as np

    model, flags = _cpuinfo()
    blas, env = blas_libraries(), blas_environment()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    warnings = []
    for lib in blas:
        arch = (lib.get("architecture") or "").lower()
        if "avx2" in flags and arch in PRE_AVX2_KERNELS:
            warnings.append(f"{lib['library']}'s {lib['internal_api']} {lib['version']} runs its {lib['architecture']} "
                            f"kernel (no AVX2) on this CPU, which has {'AVX-512' if 'avx512f' in flags else 'AVX2'}: "
                            + (SLOW_FAISS_BLAS if lib["library"] == "faiss" else SLOW_BLAS)
                            + (" (set by OPENBLAS_CORETYPE)" if env["OPENBLAS_CORETYPE"]["now"] else ""))
    cores = os.cpu_count() or 1
    if load is not None and load > 0.5 * cores:
        warnings.append(f"load average {load:.1f} on {cores} cores: other processes share the CPU, so timings are "
                        "noisy; ratios measured in the same run are the figures to compare")
    return {"cpu_model": model, "cpu_flags": {f: f in flags for f in CPU_FLAGS}, "cores": cores,
            "faiss_threads": faiss.omp_get_max_threads(), "faiss_simd": faiss_simd_level(), "blas": blas,
            "blas_env": env, "load_average": load, "warnings": warnings,
            "faiss_version": faiss.__version__, "numpy_version": np.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **({"model_runtime": model_runtime()} if with_model_runtime else {})}


def describe_machine(info: dict) -> list[str]:
    flags = ", ".join(f"{f}={'yes' if v else 'no'}" for f, v in info["cpu_flags"].items())
    lines = [f"CPU: {info['cpu_model']}, {info['cores']} cores; {flags}",
             f"FAISS {info['faiss_version']}: SIMD level {info['faiss_simd']}, {info['faiss_threads']} OpenMP threads"]
    for lib in info["blas"]:
        if "error" in lib:
            lines.append(f"BLAS: {lib['error']}")
        else:
            lines.append(f"BLAS ({lib['library']}): {lib['internal_api']} {lib['version']}, kernel "
                         f"{lib['architecture']}, {lib['threads']} threads")
    for name, v in info["blas_env"].items():
        if v["was"] is None:
            state = "not set"
        elif v["now"] is None:
            state = f"was {v['was']!r}, unset for this run (the script re-executed itself without it)"
        else:
            state = f"set to {v['now']!r} and kept (--keep-blas-env)"
        lines.append(f"{name}: {state}")
    rt = info.get("model_runtime")
    if rt:
        cap = rt["onednn_max_cpu_isa"]
        lines.append(f"oneDNN ISA cap (ONEDNN_MAX_CPU_ISA): {cap or 'not set'}"
                     + (" -- the CPU is made to run as one without the instructions above the cap" if cap else ""))
        lines.append(f"--precision auto here: {rt['auto_precision_cpu']} (AMX usable: {rt['amx_usable']}, VNNI "
                     f"usable: {rt['vnni_usable']}, int8 runtime installed: {rt['int8_available']}); "
                     f"torch {rt['torch_version']}")
    lines += [f"WARNING: {w}" for w in info["warnings"]]
    return lines


