"""Transformation library: op contract (base), spatial and intensity ops, the registry table, the TEA pool."""

from augsearch.ops.base import BinSpec, Op, OpInputError, OpSpec, UnknownOpError
from augsearch.ops.registry import get_op, get_spec, list_ops

__all__ = ["BinSpec", "Op", "OpInputError", "OpSpec", "UnknownOpError", "get_op", "get_spec", "list_ops"]
