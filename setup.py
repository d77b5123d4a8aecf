"""Builds the Cython ring core when a compiler and Cython are available.

Without them the package still installs: `lb.chwbl` (the pure-Python twin) is used instead
and `lb.ring.IMPLEMENTATION` says so.
"""
import os

from setuptools import setup

ext_modules = []
if os.environ.get("KVGATE_NO_EXT") != "1" and os.path.exists("lb/_chwbl.pyx"):
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:  # pragma: no cover - build without Cython
        pass
    else:
        ext_modules = cythonize(
            [Extension("lb._chwbl", ["lb/_chwbl.pyx"], extra_compile_args=["-O3"]),
             Extension("lb._limits", ["lb/_limits.pyx"], extra_compile_args=["-O3"])],
            compiler_directives={"language_level": "3", "boundscheck": False,
                                 "wraparound": False, "cdivision": True},
        )

setup(ext_modules=ext_modules)
