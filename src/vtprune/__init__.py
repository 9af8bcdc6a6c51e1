"""vtprune: visual token scheduling (ParVTS, ST³, FastV, ...) for HuggingFace multimodal LLMs.

    import vtprune
    with vtprune.apply(model, "parvts", budget=64) as run:
        out = model.generate(**inputs, max_new_tokens=64)
    print(run.report())
"""

from vtprune.api import apply, check
from vtprune.engine.interface import Plan
from vtprune.engine.report import Report
from vtprune.engine.run import Run
from vtprune.methods import (
    METHODS,
    ST3,
    VTW,
    FastV,
    Method,
    NoPruning,
    ParVTS,
    PDrop,
    Pool,
    RandomSubset,
    VisionZip,
    make_method,
)

__version__ = "0.1.0"
__all__ = ["apply", "check", "Run", "Report", "Plan", "Method", "METHODS", "make_method", "NoPruning", "ParVTS",
           "ST3", "FastV", "VTW", "PDrop", "VisionZip", "RandomSubset", "Pool"]
