"""The one compiled part of optimizr: the C loops of the SSIMULACRA 2 metric.

Everything else is declared in pyproject.toml. The extension is optional: where
it cannot be built (no C compiler), optimizr installs without it and
optimizr.ssimulacra2 runs its numpy twin of the same arithmetic, slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "optimizr._ssimulacra2",
            ["src/optimizr/_ssimulacra2.c"],
            depends=["src/optimizr/_ssimulacra2_kernels.h"],
            # No fused multiply-adds the code did not ask for: the roundings
            # must be the numpy twin's (and the reference tool's).
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        )
    ]
)
