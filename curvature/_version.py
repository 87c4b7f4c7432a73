"""The one place the version is written: read by setuptools (``dynamic = ["version"]``), ``curvature.__version__``
and ``curvature --version`` (which must not import torch, so this module imports nothing)."""
__version__ = "0.1.0"
