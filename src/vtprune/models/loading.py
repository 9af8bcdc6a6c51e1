"""How vtprune's own model loads treat transformers' hub kernels (the ``kernels`` package).

transformers 5.25 made ``use_kernels=True`` the default of ``from_pretrained`` (and ``kernels`` a hard
dependency): a load runs ``kernels.kernelize``, which may replace the ``forward`` of layers whose class is
marked for it (RMSNorm, activations, the rotary function, ...) with kernels downloaded from the HuggingFace
hub for the model's device. vtprune's loads do not: its hooks and measurements are written against the
stock forwards, a kernel download needs the network (vtprune's tools run offline), and a load must give
the same model on every supported transformers. So every ``from_pretrained`` of a model that vtprune makes
passes :data:`NO_HUB_KERNELS` (transformers >= 5.17, the supported range, accepts the keyword; before
5.25 its default was already ``False``), and a third-party loader that vtprune cannot pass it to (the
lmms-eval model classes) runs under :func:`hub_kernels_off_by_default`.

A model the user loaded with hub kernels is accepted by :func:`vtprune.apply` unless a kernel replaced the
forward of a module the run hooks (the decoder layers, their attention modules, the language model): see
:meth:`vtprune.engine.run.Run.attach`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

NO_HUB_KERNELS: dict[str, Any] = {"use_kernels": False}
"""Keyword arguments of every ``from_pretrained`` of a model in vtprune: no hub kernels attached."""

HUB_KERNELS_ENV = "USE_HUB_KERNELS"
"""transformers' environment switch for hub kernels (default on; ``0`` turns ``from_pretrained``'s
``use_kernels`` default off, read at each load from 5.25 on)."""


@contextlib.contextmanager
def hub_kernels_off_by_default() -> Iterator[None]:
    """While the block runs, ``from_pretrained`` attaches no hub kernels unless asked: ``USE_HUB_KERNELS``
    is set to ``0`` when it is unset, and put back (unset) after the block, also on an exception. A value
    the user set is left as it is (``USE_HUB_KERNELS=1`` keeps transformers' default, kernels on).

    For loads made by code that vtprune does not write (lmms-eval's model classes), which it cannot pass
    :data:`NO_HUB_KERNELS`. transformers < 5.25 reads the variable once at import, but its default is
    already no kernels.
    """
    if HUB_KERNELS_ENV in os.environ:
        yield
        return
    os.environ[HUB_KERNELS_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(HUB_KERNELS_ENV, None)


__all__ = ["NO_HUB_KERNELS", "HUB_KERNELS_ENV", "hub_kernels_off_by_default"]
