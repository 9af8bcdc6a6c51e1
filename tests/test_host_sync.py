"""No host-device synchronisation from vtprune in the decode loop (speed issue).

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

import pytest
import qwen_tiny
import torch
import transformers
from conftest import N_VISUAL, batch, cache_keyword, make_prompt, output_cache, tiny_llava
from test_llava_next import MIXED, tiny_llava_next
from test_llava_next import inputs as next_inputs
from test_llava_next import prompt as next_prompt
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import vtprune
from vtprune.methods.none import NoPruning

pytestmark = pytest.mark.usefixtures("one_thread")

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
DELEGATES = {("run.py", "_generate"), ("run.py", "_generate_batch"), ("run.py", "one_group"),
             ("groups.py", "generate_in_groups"), ("scoring.py", "vtprune_attention"),
             ("scoring.py", "_flash_attention"), ("llava_next.py", "get_image_features")}
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


NEW = 8
PROMPTS = [make_prompt(2, 4, 1), make_prompt(5, 9, 2), make_prompt(3, 2, 3)]
CASES = {"single": PROMPTS[:1], "left-padded-batch": PROMPTS}
LLAVA_METHODS = [("none", {}), ("fastv", {"budget": 4}), ("st3", {}), ("st3", {"anneal_every": 3}),
                 ("parvts", {"budget": 4}), ("pdrop", {}), ("vtw", {"layer": 3}), ("random", {"budget": 4}),
                 ("pool", {"budget": 4}), ("visionzip", {"budget": 6})]
QWEN_METHODS = [("none", {}), ("fastv", {"budget": 4}), ("st3", {}), ("st3", {"anneal_every": 3})]


def generate_detected(model, inputs: dict, new: int = NEW) -> SyncDetector:
    with torch.no_grad(), SyncDetector(model) as det:
        model.generate(**inputs, max_new_tokens=new, do_sample=False)
    assert det.decode_calls == new - 1, "every decode step ran under the detector"
    return det


@functools.cache
def stock_decode_events(family: str, case: str) -> int:
    """transformers' own decode syncs with no vtprune attached (what a run may not exceed)."""
    model, inputs = _model(family), _inputs(family, case)
    det = generate_detected(model, inputs)
    assert not det.of("prefill") and not det.of("decode"), "nothing is vtprune's without vtprune"
    return len(det.of("decode", "other"))


@functools.cache
def _model(family: str):
    if family.startswith("qwen"):
        return qwen_tiny.tiny_qwen(family)
    return tiny_llava(attn="eager" if family == "llava-eager" else "sdpa")


def _inputs(family: str, case: str) -> dict:
    return qwen_tiny.batch(CASES[case]) if family.startswith("qwen") else batch(CASES[case])


def check_decode_is_sync_free(family: str, case: str, method: str, opts: dict) -> None:
    model, inputs = _model(family), _inputs(family, case)
    stock = stock_decode_events(family, case)
    with vtprune.apply(model, method, **opts) as run:
        det = generate_detected(model, inputs)
    assert run.gen.phase == "decode" and run.gen.step == NEW - 1
    print(f"\n{family} {case} {method}{opts or ''}: prefill syncs vtprune {len(det.of('prefill'))}, "
          f"transformers {len(det.of('prefill', 'other'))}; decode syncs vtprune {len(det.of('decode'))}, "
          f"transformers {len(det.of('decode', 'other'))} (stock {stock})\n  prefill: {det.summary('prefill')}")
    assert not det.of("decode"), "vtprune synced in the decode loop:\n" + "\n".join(map(str, det.of("decode")))
    # nor does it make transformers sync more (e.g. through the masks it passes)
    assert len(det.of("decode", "other")) <= stock
    sample = run.report()["samples"][0]
    if method != "none":  # the pruned (non-stock) decode path ran
        assert min(sample["visual_tokens_per_layer_prefill"]) < N_VISUAL
    if method == "st3":  # VTA evicted from the KV cache during decoding
        assert sample["visual_tokens_per_layer_last_decode"] != sample["visual_tokens_per_layer_prefill"]


# ---------------------------------------------------------------- the detector itself
@dataclasses.dataclass
class SyncingInDecode(NoPruning):
    """A method that syncs five ways before every decode layer (and never in the prefill)."""

    name = "syncing"

    def on_decode_layer(self, gen) -> None:
        valid = gen.valid
        int(valid.sum())  # _local_scalar_dense
        valid[valid]  # boolean-mask indexing
        torch.where(valid)  # nonzero
        valid.cpu().tolist()  # a copy to the host (no op on CPU: the patched method); reading the copy is free
        torch.zeros(3).to(valid.device)  # a host tensor copied to the device; making it is free


def test_detector_catches_a_syncing_decode_hook():
    model, inputs = _model("llava"), _inputs("llava", "single")
    with vtprune.apply(model, SyncingInDecode()):
        det = generate_detected(model, inputs)
    calls = (NEW - 1) * len(model.model.language_model.layers)
    found = collections.Counter((e.what, e.why) for e in det.of("decode"))
    assert found == {("Tensor.__int__", "a read of tensor data on the host"): calls,
                     ("aten::index", "data-dependent size (boolean-mask indexing)"): calls,
                     ("aten::nonzero", "data-dependent size (nonzero, torch.where(cond), argwhere)"): calls,
                     ("Tensor.cpu", "a copy to the host"): calls,
                     ("Tensor.to", "a host-to-device copy"): calls}, found
    assert all("on_decode_layer" in e.where() and "run.py" in e.where() for e in det.of("decode"))
    # vtprune's own one-off prefill work is recorded as prefill (e.g. the padding counts)
    assert any("state.py" in e.where(1) for e in det.of("prefill"))
    # transformers' per-step stopping-criteria check is seen, and is not vtprune's
    assert any("__call__" in e.where(1) for e in det.of("decode", "other"))


def test_owner_rule():
    """Who owns a sync, from the stack (outermost first)."""
    hf = Path(transformers.__file__).parent

    def stack(*frames):
        return [traceback.FrameSummary(str(path), 1, name, lookup_line=False) for path, name in frames]

    test = (THIS_FILE, "test")
    generate = (VTPRUNE_DIR / "engine/run.py", "_generate_batch")
    forward = (hf / "models/llama/modeling_llama.py", "forward")
    # transformers' stopping criteria inside the generate that vtprune's wrapper calls
    assert owner(stack(test, generate, (hf / "generation/utils.py", "_sample"),
                       (hf / "generation/stopping_criteria.py", "__call__"))) == "other"
    # vtprune's hook, directly or through a method (a test's) or a transformers helper it calls
    hook = (VTPRUNE_DIR / "engine/run.py", "_decode_layer")
    assert owner(stack(test, generate, forward, hook, (VTPRUNE_DIR / "engine/state.py", "keep_visual"))) == "vtprune"
    assert owner(stack(test, generate, forward, hook, (THIS_FILE, "on_decode_layer"))) == "vtprune"
    assert owner(stack(test, generate, forward, hook, (hf / "cache_utils.py", "get_seq_length"))) == "vtprune"
    # the attention kernel that vtprune's scoring wrapper calls is transformers'; the wrapper's own code is ours
    wrapper = (VTPRUNE_DIR / "engine/scoring.py", "vtprune_attention")
    assert owner(stack(test, generate, forward, wrapper, (hf / "integrations/sdpa_attention.py", "sdpa"))) == "other"
    assert owner(stack(test, generate, forward, wrapper)) == "vtprune"
    assert owner(stack(test, forward)) == "other"


def test_transformers_syncs_are_not_attributed_to_vtprune(monkeypatch):
    """With nothing pruned the run computes what the stock model computes: the same syncs, none vtprune's,
    also those inside the attention kernel that vtprune's scoring wrapper calls."""
    model, inputs = _model("llava"), _inputs("llava", "left-padded-batch")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def syncing_sdpa(module, query, *args, **kwargs):  # a kernel that syncs (stands for transformers' code)
        bool(query.isfinite().all())
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", syncing_sdpa)
    stock = generate_detected(model, inputs)
    with vtprune.apply(model, "none"):
        det = generate_detected(model, inputs)
    kernel = [e for e in det.of("decode", "other") if "syncing_sdpa" in e.where(1)]
    assert len(kernel) == (NEW - 1) * len(model.model.language_model.layers)
    assert all("vtprune_attention" in e.where(2) for e in kernel)  # called through vtprune's wrapper
    assert not det.of("decode")

    def seen(d):
        return collections.Counter((e.what, e.where(1)) for e in d.of("decode", "other"))

    assert seen(det) == seen(stock)  # stopping criteria, SDPA mask check (padding), the kernel's


# ---------------------------------------------------------------- every method, LLaVA and Qwen2-VL
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method,opts", LLAVA_METHODS, ids=[f"{m}{o or ''}" for m, o in LLAVA_METHODS])
def test_llava_decode_loop_has_no_vtprune_sync(method, opts, case):
    check_decode_is_sync_free("llava", case, method, opts)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method,opts", [("st3", {}), ("parvts", {"budget": 4})], ids=["st3", "parvts"])
def test_llava_eager_decode_loop_has_no_vtprune_sync(method, opts, case):
    """Eager attention: every pruned layer gets an additive mask built by vtprune at each decode step."""
    check_decode_is_sync_free("llava-eager", case, method, opts)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method,opts", QWEN_METHODS, ids=[f"{m}{o or ''}" for m, o in QWEN_METHODS])
def test_qwen2_vl_decode_loop_has_no_vtprune_sync(method, opts, case):
    check_decode_is_sync_free("qwen2_vl", case, method, opts)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_decode_position_ids_of_the_adapter_do_not_sync(family, monkeypatch):
    """A hand-written decode loop without position_ids after ParVTS shortened layer 0's cache: the adapter
    computes the stock decode positions (Qwen2-VL: M-RoPE, from rope_deltas) every step, without a sync."""
    model, inputs = _model(family), _inputs(family, "single")
    inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with vtprune.apply(model, "parvts", budget=4, discard_layer=2) as run:
        adapter = type(run.adapter)
        calls = []
        original = adapter.decode_position_ids

        def spy(self, past_length, input_ids):
            calls.append(past_length)
            return original(self, past_length, input_ids)

        monkeypatch.setattr(adapter, "decode_position_ids", spy)
        if family.startswith("qwen"):
            model.model.rope_deltas = None
        with torch.no_grad(), SyncDetector(model) as det:
            out = model(**inputs, use_cache=True)
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
            for _ in range(NEW - 1):
                out = model(input_ids=token, use_cache=True, **{cache_keyword(model): cache})
                token = out.logits[:, -1:].argmax(-1)
    s = inputs["input_ids"].shape[1]
    assert calls == list(range(s, s + NEW - 1))
    assert det.decode_calls == NEW - 1
    print(f"\n{family} parvts hand-written loop: prefill syncs vtprune {len(det.of('prefill'))}; "
          f"decode syncs vtprune {len(det.of('decode'))}, transformers {len(det.of('decode', 'other'))}")
    assert not det.of("decode"), "\n".join(map(str, det.of("decode")))


def test_llava_next_groups_have_no_vtprune_sync_in_decode():
    """A LLaVA-NeXT batch of mixed image sizes runs one ``generate`` per group of alike samples
    (``engine/groups.py``): each group's set-up (selecting its samples, encoding its images, the previous
    group's report) is one-off work before its prefill; no decode step of any group syncs."""
    model = tiny_llava_next()
    x = next_inputs([next_prompt(2 + b, 3 + 2 * b, 20 + b) for b in range(len(MIXED))], MIXED)
    for method, opts in [("none", {}), ("st3", {})]:
        with vtprune.apply(model, method, **opts) as run, torch.no_grad(), SyncDetector(model) as det:
            model.generate(**x, max_new_tokens=NEW, do_sample=False)
        groups = run.report()["timing"]["groups"]
        assert len(groups) == 3 and det.decode_calls == len(groups) * (NEW - 1)
        print(f"\nllava_next groups {method}: prefill syncs vtprune {len(det.of('prefill'))}; decode syncs vtprune "
              f"{len(det.of('decode'))}, transformers {len(det.of('decode', 'other'))}")
        assert not det.of("decode"), "\n".join(map(str, det.of("decode")))
