"""Generates the gRPC stubs from proto/ at build time, so they are never edited by hand."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithStubs(build_py):
    def run(self) -> None:
        from ttmm_vllm.stubs import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
