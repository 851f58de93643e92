"""Errors that the CLI turns into exit codes (DESIGN.md, CLI contract)."""


class OnnxrepError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits 2."""


class VerificationFailed(OnnxrepError):
    """The fused model does not match the input model: the CLI exits 1."""


class RulesDidNotConverge(OnnxrepError):
    """The engine hit its iteration cap: a pair of rules keeps rewriting each other."""
