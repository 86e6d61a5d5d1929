"""Which versions of optimizr and of its libraries do the work, and which encoder runs.

Said by ``optimizr --version``, kept in summary.json's ``tool`` and served as
Prometheus' ``optimizr_build_info``: a run's figures mean little without them.
"""

from __future__ import annotations

import platform
from importlib import metadata

from optimizr.config import EncodeOptions
from optimizr.errors import UsageError
from optimizr.libwebp import EncoderInfo, encoder_info


def tool_versions(encoder: str = "auto") -> dict[str, str]:
    import pyvips

    from optimizr import __version__

    try:
        binary = metadata.version("pyvips-binary")
    except metadata.PackageNotFoundError:
        binary = "none (system libvips)"
    info = encoder_info(encoder)
    return {
        "name": "optimizr",
        "version": __version__,
        "python": platform.python_version(),
        "pyvips": metadata.version("pyvips"),
        "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}",
        "encoder": info.name,
        # libvips links libwebp statically and exports neither its symbols nor its
        # version; for that fallback the wheel that bundles it is the fact there is.
        "libwebp": (
            f"bundled with pyvips-binary {binary}" if info.fallback else info.libwebp_version
        ),
        "libwebp_origin": info.origin,
        # The --target-score metric's loops: the C ones, or their numpy twins (slower).
        "ssimulacra2": _metric_loops(),
    }


def _metric_loops() -> str:
    """Which loops score: ``C (avx2+fma)``, ``C (baseline)``, or numpy. Asked of the
    extension alone, which loads no numpy: a run's parent process never needs it."""
    try:
        from optimizr import _ssimulacra2
    except ImportError:
        return "numpy (the C loops are not built)"
    return f"C ({_ssimulacra2.KERNELS})"


def check_encoder(options: EncodeOptions) -> EncoderInfo:
    """The encoder a run will use, checked once at its start (STYLE rule 9): asking
    for libwebp where it cannot load is a usage error, not a slow run."""
    info = encoder_info(options.encoder)
    if options.encoder == "libwebp" and info.fallback:
        raise UsageError(f"--encoder libwebp: {info.reason}")
    return info


__all__ = ["check_encoder", "tool_versions"]
