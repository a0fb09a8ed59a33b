"""Only the compiled kernels; everything else about the package is in pyproject.toml.

``optional=True``: where the C compiler or Python's headers are missing the install still
succeeds, and ``rlsparse.delta`` codes with numpy (the same bytes, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("rlsparse.delta._kernels", ["src/rlsparse/delta/_kernels.c"], optional=True)])
