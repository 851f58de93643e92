"""onnxrep: re-parameterize training-time multi-branch ONNX models into plain networks."""

from onnxrep.api import Result, __version__, fuse, select_rules, write
from onnxrep.errors import OnnxrepError, RulesDidNotConverge, VerificationFailed

__all__ = [
    "OnnxrepError",
    "Result",
    "RulesDidNotConverge",
    "VerificationFailed",
    "__version__",
    "fuse",
    "select_rules",
    "write",
]
