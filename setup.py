"""Builds the optional compiled mixing hook (native/) as dera_local._native.

Optional on purpose: without a C compiler the package still installs and runs the
numpy path, which gives bit-identical results; `dera-local info` says which is active.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildNativeHook(build_ext):
    def build_extensions(self) -> None:
        for ext in self.extensions:
            if self.compiler.compiler_type == "msvc":
                ext.extra_compile_args = ["/O2", "/fp:precise"]
            else:
                ext.extra_compile_args = [
                    "-O3",
                    "-std=c11",
                    "-ffp-contract=off",  # no FMA: numpy must round identically
                    "-fno-trapping-math",  # lets branch-free selects vectorize
                ]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "dera_local._native",
            sources=["native/dera_mix.c", "native/dera_score.c", "native/dera_mix_module.c"],
            include_dirs=["native"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildNativeHook},
)
