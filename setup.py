"""Build the optional compiled fan-out core.

Static metadata lives in pyproject.toml; this file only declares the extension. Without a
compiler the install still succeeds with the pure-Python core, unless
WSHUB_BUILD_EXTENSION=yes asks for a build failure to be fatal (CI and wheel builds).
"""

import os
import platform

from setuptools import Extension, setup

BUILD_REQUIRED = os.environ.get("WSHUB_BUILD_EXTENSION", "").lower() in {"1", "yes", "true"}
SKIP = os.environ.get("WSHUB_NO_EXTENSIONS", "") not in {"", "0"}

extensions = []
if not SKIP and platform.python_implementation() == "CPython":
    extensions.append(
        Extension(
            "wshub._fanout",
            ["wshub/_fanout.pyx"],
        )
    )

if extensions:
    from Cython.Build import cythonize

    optional = not BUILD_REQUIRED
    extensions = cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "embedsignature": True,
        },
    )
    for extension in extensions:  # cythonize does not carry the flag over
        extension.optional = optional

setup(ext_modules=extensions)
