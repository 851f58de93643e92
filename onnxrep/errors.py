"""Errors, and the exit codes the CLI gives them (docs/DESIGN.md, "The CLI contract").

  OnnxrepError         bad input or usage: one line, exit 2
  VerificationFailed   the fused model differs from the input: exit 1
  InternalError        onnxrep itself failed and no output can be made: one line, exit 3
Any other exception that reaches the CLI is an internal error too (exit 3).
"""


class OnnxrepError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits 2."""


class VerificationFailed(OnnxrepError):
    """The fused model does not match the input model: the CLI exits 1."""


class InternalError(Exception):
    """onnxrep failed on a valid model and can write nothing: the CLI exits 3."""


class RulesDidNotConverge(InternalError):
    """The engine hit its iteration cap: a pair of rules keeps rewriting each other."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
