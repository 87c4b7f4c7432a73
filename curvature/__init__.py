"""curvature: exact, fast curvature diagnostics for PyTorch."""
from .hvp import HVPEngine
from .operators import HessianOperator, LinearOperator, MatrixOperator

__version__ = "0.1.0"
