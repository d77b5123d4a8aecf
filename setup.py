"""Builds the Cython cores (the ring, the per-key budgets, CacheAware's prefix index) when a
compiler and Cython are available.

Without them the package still installs: the pure-Python twins (`lb.chwbl`, `lb.prefix_index`)
are used instead and `lb.ring.IMPLEMENTATION` says so.
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
            [Extension(name, [f"lb/{name[3:]}.pyx"], extra_compile_args=["-O3"])
             for name in ("lb._chwbl", "lb._limits", "lb._prefix_index")],
            compiler_directives={"language_level": "3", "boundscheck": False,
                                 "wraparound": False, "cdivision": True},
        )

setup(ext_modules=ext_modules)
