"""Visual-token methods: one small module each, free of model classes. Importing this package registers
them (each module calls :func:`register_method` on its class); :data:`METHODS` is the registry."""

from __future__ import annotations

from vtprune.methods import fastv, none, parvts, pdrop, pool, random_subset, st3, visionzip, vtw  # noqa: F401
from vtprune.methods.base import Method
from vtprune.methods.fastv import FastV
from vtprune.methods.none import NoPruning
from vtprune.methods.parvts import ParVTS
from vtprune.methods.pdrop import PDrop
from vtprune.methods.pool import Pool
from vtprune.methods.random_subset import RandomSubset
from vtprune.methods.registry import METHODS, make_method, register_method
from vtprune.methods.spec import MethodSpec, expand, parse_budget, parse_option, parse_spec, parse_value
from vtprune.methods.st3 import ST3
from vtprune.methods.visionzip import VisionZip
from vtprune.methods.vtw import VTW

__all__ = ["METHODS", "Method", "MethodSpec", "make_method", "register_method", "parse_spec", "parse_budget",
           "parse_option", "parse_value", "expand", "NoPruning", "ParVTS", "ST3", "FastV", "VTW", "PDrop",
           "VisionZip", "RandomSubset", "Pool"]
