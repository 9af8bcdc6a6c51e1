"""A host-device synchronisation detector for tests (used by ``test_host_sync.py`` and the conformance
matrix).

No host-device synchronisation from vtprune in the decode loop (speed issue).

A host sync is anything that makes the host wait for the device: reading a value (``.item()``,
``int(t)``, ``if t:``), an op whose output size depends on the data (``nonzero``, boolean-mask indexing,
``unique``, ``repeat_interleave`` with tensor repeats), a copy to the host, or a copy from host memory to
the device (PyTorch waits for it unless ``non_blocking``). The tests run on CPU, where nothing waits, so
:class:`SyncDetector` records what would sync on a GPU, with the Python stack of each, and :func:`owner`
attributes an event to vtprune when vtprune's code made the call. transformers' own syncs (the stopping
criteria of ``generate``, once per step; its SDPA mask check with padding) are not ours.

Only the decode phase must be free of them. Prefill syncs are allowed: they happen once per generation
(finding the visual tokens and the padding, ParVTS's packing, the ledger's per-layer counts), not once
per generated token; the tests print their prefill counts (``pytest -s``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

import vtprune

VTPRUNE_DIR = Path(vtprune.__file__).resolve().parent
TORCH_DIR = Path(torch.__file__).resolve().parent
THIS_FILE = Path(__file__).resolve()

# aten ops that read device data on the host, or whose output size depends on the data
SYNC_OPS = {
    "aten::_local_scalar_dense": "a scalar read on the host (.item(), int(t), float(t), bool(t), if t:)",
    "aten::nonzero": "data-dependent size (nonzero, torch.where(cond), argwhere)",
    "aten::masked_select": "data-dependent size (masked_select)",
    "aten::_unique": "data-dependent size (unique)",
    "aten::_unique2": "data-dependent size (unique)",
    "aten::unique_dim": "data-dependent size (unique)",
    "aten::unique_consecutive": "data-dependent size (unique_consecutive)",
    "aten::unique_dim_consecutive": "data-dependent size (unique_consecutive)",
    "aten::bincount": "data-dependent size (bincount)",
    "aten::histc": "min / max read on the host (histc)",
    "aten::equal": "a bool on the host (torch.equal)",
    "aten::allclose": "a bool on the host (torch.allclose)",
}
INDEX_OPS = ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")  # sync with a bool index
COPY_INTO = {"aten::copy_": 1, "aten::index_put": 2, "aten::index_put_": 2, "aten::_index_put_impl_": 2}  # source arg
# Tensor methods that read the tensor on the host; on CPU some dispatch no op at all (tolist, numpy, cpu)
HOST_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                "__contains__", "__array__", "__format__", "__repr__")
# torch functions that make a host tensor when given no device=
FACTORIES = ("zeros", "ones", "full", "empty", "arange", "linspace", "logspace", "eye", "rand", "randn",
             "randint", "randperm", "tensor", "as_tensor", "from_numpy")
# vtprune frames that only hand a call on to the code they wrap (transformers' generate, the attention
# kernel, LLaVA-NeXT's image features): a sync further in belongs to that code
DELEGATES = {("lifecycle.py", "generate"), ("lifecycle.py", "_grouped"), ("lifecycle.py", "_batch"),
             ("lifecycle.py", "one_group"), ("conversation.py", "reorder_cache"),
             ("groups.py", "generate_in_groups"), ("attention.py", "vtprune_attention"),
             ("attention.py", "_flash_attention"), ("llava_next.py", "get_image_features")}
_DETECTOR_FRAMES = {"__torch_dispatch__", "__torch_function__", "recording", "_record", "_pre_call", "_post_call"}


@functools.cache
def _under(filename: str, root: Path) -> bool:
    return Path(filename).resolve().is_relative_to(root)


@functools.cache
def _is_this_file(filename: str) -> bool:
    return Path(filename).resolve() == THIS_FILE


def _skipped(frame) -> bool:
    """torch's own frames and the detector's."""
    return _under(frame.filename, TORCH_DIR) or (frame.name in _DETECTOR_FRAMES and _is_this_file(frame.filename))


def owner(stack: list) -> str:
    """``"vtprune"`` when vtprune made the syncing call, else ``"other"``.

    The innermost frame outside torch (and the detector) is vtprune's: vtprune's. Otherwise (transformers,
    or a test's code that vtprune called) the first vtprune frame further out decides: a vtprune function
    that called it (a hook calling a method, a method calling a transformers helper) owns the sync, unless
    that frame only hands the call on to the code it wraps (:data:`DELEGATES`). No vtprune frame: other.
    """
    frames = [f for f in reversed(stack) if not _skipped(f)]
    for i, f in enumerate(frames):
        if _under(f.filename, VTPRUNE_DIR):
            return "other" if i > 0 and (Path(f.filename).name, f.name) in DELEGATES else "vtprune"
    return "other"


@dataclasses.dataclass
class Event:
    phase: str  # "prefill", "decode" or "end" (see SyncDetector)
    what: str  # the aten op, Tensor method or torch function
    why: str
    stack: list  # traceback.FrameSummary, outermost first
    owner: str = ""

    def __post_init__(self):
        self.owner = owner(self.stack)

    def where(self, depth: int = 4) -> str:
        """The innermost frames outside torch, innermost first."""
        frames = [f for f in self.stack if not _skipped(f)][-depth:]
        return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))

    def __str__(self) -> str:
        return f"[{self.phase}/{self.owner}] {self.what} ({self.why}) at {self.where()}"


def _is_cpu(device) -> bool:
    """A device named "cpu" literally (on CPU every ``torch.device`` of the model is "cpu" too, so only the
    string says the code means the host)."""
    return isinstance(device, str) and device.startswith("cpu")


class _Factories(TorchFunctionMode):
    """Marks the tensors that :data:`FACTORIES` make without ``device=`` as host tensors; records
    ``torch.tensor`` / ``as_tensor`` of host data onto a device."""

    def __init__(self, detector: SyncDetector):
        super().__init__()
        self.detector = detector
        self.watched = {getattr(torch, name) for name in FACTORIES}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.watched or (args and torch.is_tensor(args[0]) and func in (torch.tensor, torch.as_tensor)):
            return func(*args, **kwargs)  # (a tensor's copy: the dispatch mode sees its ops)
        device = kwargs.get("device")
        if device is not None and not _is_cpu(device) and func in (torch.tensor, torch.as_tensor):
            self.detector._record(f"torch.{func.__name__}(device=...)", "a host-to-device copy of host data")
        out = func(*args, **kwargs)
        if device is None or _is_cpu(device):
            self.detector._host[out] = True
        return out


class SyncDetector(TorchDispatchMode):
    """Record what would make the host wait for a GPU while a model runs.

    Host tensors: on a GPU machine some tensors live in host memory, and using them costs no sync. The
    detector tracks them: those made by a factory without ``device=``, by ``.cpu()`` / ``.to("cpu")``, and
    every op output computed from host tensors only. Events (only on tensors that are not host tensors):
    an aten op of :data:`SYNC_OPS`, ``repeat_interleave`` with tensor repeats, an index op with a boolean
    index, a :data:`HOST_METHODS` call, ``.to("cpu")``; and host-to-device copies: ``.to(device)`` of a
    host tensor, ``copy_`` / ``index_put_`` from a host tensor into a device one, ``torch.tensor(data,
    device=...)``.

    Phases: "prefill" up to the end of a forward call of ``model`` with several input tokens, "decode"
    from there to the end of the last decode forward call (every decode step, and what runs between
    them), "end" after it (the wrap-up once per ``generate``: its last stopping-criteria check, merging
    the groups' outputs). What runs between the end of a forward call and the start of a further prefill
    call is that generation's set-up (``generate`` running one group of samples after another: selecting
    the group, encoding its images), hence "prefill" too.

    Use as ``with SyncDetector(model) as det: model.generate(...)``; then ``det.of("decode")``.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.events: list[Event] = []
        self.phase = "prefill"
        self.decode_calls = 0
        self._pending: list[Event] = []  # recorded since the end of the last forward call
        self._host = WeakIdKeyDictionary()
        self._depth = 0  # > 0 inside a recorded Tensor method: what it calls is the same event
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------ phases
    def _pre_call(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            self.phase = "prefill"
            for e in self._pending:
                e.phase = "prefill"
        elif self.phase == "decode":
            self.decode_calls += 1

    def _post_call(self, module, args, kwargs, output):
        self.phase = "decode"
        self._pending = []

    # ------------------------------------------------------------------ recording
    def _record(self, what: str, why: str) -> None:
        if self._depth == 0:
            self.events.append(Event(self.phase, what, why, traceback.extract_stack()[:-1]))
            self._pending.append(self.events[-1])

    def _on_host(self, tensor) -> bool:
        return tensor in self._host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host = bool(tensors) and all(self._on_host(t) for t in tensors)
        name = func._schema.name
        if not host:
            if name in SYNC_OPS:
                self._record(name, SYNC_OPS[name])
            elif name == "aten::repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None:
                self._record(name, "data-dependent size (repeat_interleave with tensor repeats)")
            elif name in INDEX_OPS and len(args) > 1 and any(
                    t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1]):
                self._record(name, "data-dependent size (boolean-mask indexing)")
            if name in COPY_INTO and len(args) > COPY_INTO[name] and torch.is_tensor(args[COPY_INTO[name]]) \
                    and self._on_host(args[COPY_INTO[name]]):
                self._record(name, "a host-to-device copy (into a device tensor from a host tensor)")
        out = func(*args, **kwargs)
        if host:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._host[t] = True
        return out

    def _patch(self, name: str, moves) -> None:
        """Record ``Tensor.<name>``; ``moves(tensor, *args, **kwargs)`` says what it does: "read" (reads the
        data on the host), "host" / "device" (a copy there), None (neither: a dtype conversion)."""
        original = getattr(torch.Tensor, name)
        detector = self

        @functools.wraps(original)
        def recording(tensor, *args, **kwargs):
            target = moves(tensor, *args, **kwargs)
            on_host = detector._on_host(tensor)
            if not on_host and target in ("read", "host"):
                detector._record(f"Tensor.{name}", "a read of tensor data on the host" if target == "read" else "a copy to the host")
            elif on_host and target == "device":
                detector._record(f"Tensor.{name}", "a host-to-device copy")
            detector._depth += 1
            try:
                out = original(tensor, *args, **kwargs)
            finally:
                detector._depth -= 1
            if target in ("host", "device") and isinstance(out, torch.Tensor):
                if out is tensor and on_host != (target == "host"):
                    out = out.view_as(out)  # a no-op move on CPU: a new tensor object, as the copy on a GPU
                if target == "host":
                    detector._host[out] = True
                else:
                    detector._host.pop(out, None)
            return out

        setattr(torch.Tensor, name, recording)
        self._stack.callback(setattr, torch.Tensor, name, original)

    def __enter__(self):
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.model.register_forward_pre_hook(self._pre_call, with_kwargs=True))
            stack.enter_context(self.model.register_forward_hook(self._post_call, with_kwargs=True))
            self._stack = stack.pop_all()
        for name in HOST_METHODS:
            self._patch(name, (lambda *a, **k: "host") if name == "cpu" else (lambda *a, **k: "read"))
        self._patch("to", self._moves)
        self._stack.enter_context(_Factories(self))
        return super().__enter__()

    def _moves(self, tensor, *args, **kwargs):
        """Where ``tensor.to(*args, **kwargs)`` puts the result: "host" ("cpu", or a host tensor's device),
        "device" (any other device: the model's), None (a dtype conversion)."""
        target = kwargs.get("device", args[0] if args and isinstance(args[0], str | torch.device | torch.Tensor) else None)
        if target is None:
            return None
        return "host" if (self._on_host(target) if torch.is_tensor(target) else _is_cpu(target)) else "device"

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()
            for e in self._pending:
                e.phase = "end"

    # ------------------------------------------------------------------ reading
    def of(self, phase: str, who: str = "vtprune") -> list[Event]:
        return [e for e in self.events if e.phase == phase and e.owner == who]

    def summary(self, phase: str, who: str = "vtprune") -> str:
        counts = collections.Counter(f"{e.what} at {e.where(1)}" for e in self.of(phase, who))
        return "; ".join(f"{n} x {k}" for k, n in counts.items())
