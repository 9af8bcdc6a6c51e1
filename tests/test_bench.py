"""The benchmark harness (``vtprune.bench``, ``vtprune bench``): architecture configs, synthetic inputs
(images, and videos on the Qwen2.5-VL architectures), the ideal-speedup arithmetic, one tiny end-to-end run
through the CLI, one tiny video run over two frame counts, and bad input. Nothing here asserts a timing
value: timings only have to exist and be positive."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import vtprune
from vtprune import cli
from vtprune.bench import archs, ideal, measure, runner
from vtprune.bench.inputs import synthetic_inputs, visual_tokens

TINY_VISUAL = 16
PHASES = ("prefill", "decode", "end_to_end")


# ---------------------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("name, d, layers, heads, mlp", [
    ("llava-1.5-7b", 4096, 32, 32, 11008),
    ("llava-1.5-13b", 5120, 40, 40, 13824),
    ("llava-cpu-small", 1024, 8, 16, 2816),
])
def test_arch_configs_have_the_stated_dims(name, d, layers, heads, mlp):
    cfg = archs.arch_config(name)  # the config only: no weights are allocated
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size, t.vocab_size) == \
        (d, layers, heads, mlp, 32064)
    assert (v.image_size, v.patch_size) == (336, 14)
    assert archs.image_tokens(cfg) == 576 == (336 // 14) ** 2
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == 32000


@pytest.mark.parametrize("name, d, layers, heads, kv, mlp, vit, frame, per_frame", [
    ("qwen2.5-vl-7b", 3584, 28, 28, 4, 18944, (32, 1280, 3420, 16), 448, 128),
    ("qwen2.5-vl-cpu-small", 1024, 8, 16, 4, 2816, (4, 256, 688, 4), 224, 32),
])
def test_qwen_arch_configs_have_the_stated_dims(name, d, layers, heads, kv, mlp, vit, frame, per_frame):
    cfg = archs.arch_config(name)
    t, v = cfg.text_config, cfg.vision_config
    assert type(cfg).__name__ == "Qwen2_5_VLConfig" and cfg.model_type == "qwen2_5_vl"
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
            t.vocab_size) == (d, layers, heads, kv, mlp, 152064)
    assert sum(t.rope_parameters["mrope_section"]) == d // heads // 2  # M-RoPE sections cover the rotary half
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads) == vit and v.out_hidden_size == d
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.window_size) == (14, 2, 2, 112)
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) == (151655, 151656, 151652)
    assert archs.get_arch(name).frame_size == frame
    # an image: (frame / 28)^2 merged tokens; a video of F frames: F / 2 temporal patches of as many
    assert visual_tokens(cfg, None, frame) == 2 * per_frame == (frame // 28) ** 2
    assert [visual_tokens(cfg, f, frame) for f in (4, 8, 16)] == [4 * per_frame, 8 * per_frame, 16 * per_frame]
    assert archs.get_arch("qwen2.5-vl-7b").vision["fullatt_block_indexes"] == [7, 15, 23, 31]


def test_clip_tower_of_llava_15():
    v = archs.arch_config("llava-1.5-7b").vision_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)


def test_unknown_arch_names_the_accepted_ones():
    for call in (lambda: archs.arch_config("llava-9b"), lambda: archs.build_model("llava-9b")):
        with pytest.raises(ValueError, match="unknown arch 'llava-9b'; accepted: .*llava-1.5-7b.*llava-cpu-small"):
            call()
    with pytest.raises(ValueError, match="accepted: sdpa, eager"):
        archs.build_model("tiny", attn="flash_attention_3")


def test_tiny_model_and_inputs():
    model = archs.build_model("tiny")
    assert model.generation_config.eos_token_id is None
    inputs = synthetic_inputs(model, batch=3, prompt_tokens=10, seed=1)
    ids = inputs["input_ids"]
    assert ids.shape == (3, 10 + TINY_VISUAL) and inputs["attention_mask"].all()
    assert ((ids == model.config.image_token_id).sum(1) == TINY_VISUAL).all()
    assert torch.equal(ids[0], ids[2])  # identical rows
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="prompt_tokens must be an int >= 2"):
        synthetic_inputs(model, prompt_tokens=1)
    with pytest.raises(ValueError, match="video inputs need a model that takes videos.*'llava' takes images only"):
        synthetic_inputs(model, video_frames=4)


QWEN_TINY_FRAME = 8  # merged tokens per temporal patch of the 32 px frames: (32 / (4 x 2))^2 = 16, 8 per frame


@pytest.fixture(scope="module")
def qwen_tiny():
    return archs.build_model("qwen2.5-vl-tiny")


def test_qwen_video_and_image_inputs_are_laid_out_as_the_processor_lays_them(qwen_tiny):
    model, cfg = qwen_tiny, qwen_tiny.config
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and model.generation_config.eos_token_id is None
    video = synthetic_inputs(model, batch=2, prompt_tokens=10, seed=1, video_frames=6, frame_size=32)
    ids = video["input_ids"]
    n = 6 * QWEN_TINY_FRAME
    assert ids.shape == (2, 10 + n + 2) and torch.equal(ids[0], ids[1])
    row = ids[0].tolist()
    start = row.index(cfg.vision_start_token_id)
    assert start == 1 and row[start + 1:start + 1 + n] == [cfg.video_token_id] * n  # after the first tenth
    assert row[start + 1 + n] == cfg.vision_end_token_id and cfg.image_token_id not in row
    assert torch.equal(video["mm_token_type_ids"], 2 * (ids == cfg.video_token_id).int())
    # 3 temporal patches of 8 x 8 patches per sample, one row of 3 x 2 x 4 x 4 values each
    assert video["video_grid_thw"].tolist() == [[3, 8, 8]] * 2
    assert video["pixel_values_videos"].shape == (2 * 3 * 64, 96) and video["second_per_grid_ts"].tolist() == [1.0, 1.0]
    assert "pixel_values" not in video
    image = synthetic_inputs(model, batch=1, prompt_tokens=10, frame_size=64)
    assert image["image_grid_thw"].tolist() == [[1, 16, 16]] and image["pixel_values"].shape == (256, 96)
    assert (image["input_ids"] == cfg.image_token_id).sum() == 64 == visual_tokens(cfg, None, 64)
    with torch.no_grad():  # the stock model takes them: one visual token per merged patch of the video
        assert torch.isfinite(model(**video, logits_to_keep=1).logits).all()


@pytest.mark.parametrize("frames, size, match", [
    (3, 32, "video_frames 3: this model encodes frames in temporal patches of 2; give a multiple of 2"),
    (0, 32, "video_frames must be an int >= 1"),
    (4, 36, r"frame_size 36 px must be a multiple of 8 px \(patch 4 px x merge 2\)"),
    (4, 0, "frame_size must be an int >= 8"),
])
def test_qwen_video_inputs_reject_bad_shapes(qwen_tiny, frames, size, match):
    with pytest.raises(ValueError, match=match):
        synthetic_inputs(qwen_tiny, video_frames=frames, frame_size=size)


# ---------------------------------------------------------------------------------------- planning / bad input
def test_plan_cases():
    cases = runner.plan_cases(["none", "fastv", "st3"], [8, 4, "default"], TINY_VISUAL, 6)
    assert [c.name for c in cases] == ["stock", "none", "fastv@8", "fastv@4", "fastv@default",
                                       "st3@8", "st3@4", "st3@default"]
    assert cases[0].method is None
    assert dict(cases[2].options) == {"budget": 8} and cases[-1].options == ()
    cases = runner.plan_cases(["st3", "st3:anneal_every=4"], [8], TINY_VISUAL, 6)  # fixed options after colons
    assert [c.name for c in cases] == ["stock", "st3@8", "st3:anneal_every=4@8"]
    assert dict(cases[2].options) == {"anneal_every": 4, "budget": 8} and cases[2].method == "st3"


@pytest.mark.parametrize("methods, budgets, match", [
    (["fastv", "magic"], [4], "unknown method 'magic'; accepted: " + ", ".join(sorted(vtprune.METHODS))),
    (["fastv"], [17], r"budget 17 out of range: budgets are ints in \[1, 16\]"),
    (["parvts"], [0], r"budget 0 out of range: budgets are ints in \[1, 16\]"),
    (["st3"], [], r"method 'st3' needs at least one budget"),
    (["st3:anneal_every=0"], [8], r"anneal_every must be an int >= 1"),
    (["st3:every"], [8], r"expected KEY=VALUE"),
])
def test_plan_cases_rejects_bad_input(methods, budgets, match):
    with pytest.raises(ValueError, match=match):
        runner.plan_cases(methods, budgets, TINY_VISUAL, 6)


@pytest.mark.parametrize("field, value", [("batch", 0), ("new_tokens", 0), ("repeats", 0), ("prompt_tokens", 1),
                                          ("warmup", -1)])
def test_spec_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an int >= "):
        runner.BenchSpec(**{field: value}).validate()


@pytest.mark.parametrize("argv, match", [
    (["--arch", "llava-9b"], "unknown arch 'llava-9b'; accepted: llava-1.5-13b, llava-1.5-7b, llava-cpu-small, "
                             "qwen2.5-vl-7b, qwen2.5-vl-cpu-small, qwen2.5-vl-tiny, tiny"),
    (["--arch", "tiny", "--methods", "none,magic"], "unknown method 'magic'; accepted: " + ", ".join(sorted(vtprune.METHODS))),
    (["--arch", "tiny", "--budgets", "64"], r"budget 64 out of range: budgets are ints in [1, 16]"),
    (["--arch", "tiny", "--new-tokens", "0"], "new_tokens must be an int >= 1"),
    (["--arch", "tiny", "--model", "x"], "not allowed with argument"),
    (["--arch", "tiny", "--budgets", "a,b"], "budget 'a': expected visual tokens per image (e.g. 64), a percentage"),
    (["--arch", "tiny", "--attn", "flash_attention_3"], "invalid choice"),
    (["--arch", "tiny", "--video-frames", "4"], "video inputs need a model that takes videos"),
    (["--video-frames", "4"], "--video-frames: the bundled model takes images only"),
    (["--arch", "tiny", "--frame-size", "64"], "frame_size applies to models whose visual tokens follow"),
    (["--arch", "qwen2.5-vl-tiny", "--video-frames", "4,5"], "video_frames 5: this model encodes frames in temporal "
                                                            "patches of 2"),
    (["--arch", "qwen2.5-vl-tiny", "--video-frames", "0"], "expected comma-separated frame counts >= 1"),
    (["--arch", "qwen2.5-vl-tiny", "--video-frames", "a"], "expected comma-separated frame counts >= 1"),
    (["--arch", "qwen2.5-vl-tiny", "--video-frames", "2,4", "--budgets", "24"],
     "budget 24 out of range: budgets are ints in [1, 16] (visual tokens per video of this model)"),
    (["--arch", "qwen2.5-vl-tiny", "--frame-size", "30"], "frame_size 30 px must be a multiple of 8 px"),
])
def test_cli_bench_bad_input(capsys, monkeypatch, argv, match):
    def boom(*a, **k):
        raise AssertionError("no model may be built on bad input")
    monkeypatch.setattr(archs, "build_model", boom)
    code = cli.main(["bench", *argv])
    err = capsys.readouterr().err
    assert code == 2 and match in err


# ---------------------------------------------------------------------------------------- ideal speedups
def test_ideal_speedups_arithmetic():
    work = {"decode_steps": 2,
            "unpruned": {"prefill": {"decoder_flops": 100, "flops": 120, "bytes": 10},
                         "decode": {"decoder_flops": 10, "flops": 12, "bytes": 100}},
            "pruned": {"prefill": {"decoder_flops": 25, "flops": 45, "bytes": 10},
                       "decode": {"decoder_flops": 5, "flops": 7, "bytes": 80}}}
    out = ideal.ideal_speedups(work, flops_per_s=1000.0, bytes_per_s=1000.0)
    assert out["flops"] == {"prefill": 4.0, "decode": 2.0, "end_to_end": 110 / 30}
    # prefill compute-bound (120 vs 45 FLOPs), decode memory-bound (100 vs 80 bytes)
    assert out["roofline"]["prefill"] == pytest.approx(120 / 45)
    assert out["roofline"]["decode"] == pytest.approx(100 / 80)
    assert out["roofline"]["end_to_end"] == pytest.approx((120 + 100) / (45 + 80))
    assert out["roofline_ms"]["pruned"]["decode"]["bound"] == "memory"
    assert out["roofline_ms"]["pruned"]["prefill"]["bound"] == "compute"


def test_median_interval_is_the_binomial_order_statistic_interval():
    assert measure.median_interval([1, 2, 3, 4, 5]) is None  # P(all 5 on one side) = 1/32 > 2.5 %
    assert measure.median_interval([6, 1, 5, 2, 4, 3]) == (1, 6)  # 1/64 <= 2.5 % < 7/64
    assert measure.median_interval(range(1, 10)) == (2, 8)
    assert measure.median_interval([*range(30, 0, -1), None]) == (10, 21)  # the textbook ranks for n = 30
    assert measure.median_interval(range(1, 31), level=0.5) == (13, 18)  # P(X <= 12) = 0.18 <= 0.25 < P(X <= 13)


def test_peak_memory_reports_a_kind_or_a_reason():
    with measure.PeakMemory("cpu") as mem:
        torch.ones(1 << 20)
    r = mem.result
    assert set(r) == {"kind", "peak_bytes", "delta_bytes", "note"}
    assert (r["kind"] == "cpu_peak_rss" and r["peak_bytes"] > 0) or (r["kind"] is None and r["note"])


# ---------------------------------------------------------------------------------------- a tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # ST3 evicting at every decode step (its default, every 8 steps, would not evict in a 3-token answer)
    argv = ["bench", "--arch", "tiny", "--methods", "none,fastv,st3:anneal_every=1,parvts", "--budgets", "4",
            "--prompt-tokens", "12", "--new-tokens", "3", "--batch", "2", "--repeats", "2", "--warmup", "1",
            "--matmul-size", "128", "--copy-mb", "4", "--dtype", "float32", "--out", str(out)]
    code = cli.main(argv)
    assert code == 0
    files = {p.suffix: p for p in out.iterdir()}
    return json.loads(files[".json"].read_text()), files


def test_bench_writes_json_markdown_and_plot(tiny_run, capsys):
    result, files = tiny_run
    assert files[".json"].name == "bench-b2-p12-n3-float32.json"
    assert ".md" in files
    if importlib.util.find_spec("matplotlib") is not None:
        assert files[".png"].stat().st_size > 0
    md = files[".md"].read_text()
    for text in ("# vtprune bench: tiny", "| stock |", "| none |", "| fastv@4 |", "| st3:anneal_every=1@4 |", "| parvts@4 |",
                 "Speedup vs stock: TTFT", "Speedup vs stock: decode per token", "Speedup vs stock: end-to-end",
                 "machinery overhead", "Scoring cost"):
        assert text in md
    assert set(result) == {"meta", "spec", "ceilings", "model_work", "cases", "overhead", "scoring"}
    for key in ("date", "host", "device", "device_name", "torch", "transformers", "dtype", "attention", "command"):
        assert result["meta"][key]
    assert result["meta"]["visual_tokens_per_image"] == TINY_VISUAL
    assert result["ceilings"]["matmul"]["flops_per_s"] > 0 and result["ceilings"]["copy"]["bytes_per_s"] > 0


def test_bench_cases_hold_raw_repeats_medians_and_ideals(tiny_run):
    result, _ = tiny_run
    cases = {c["name"]: c for c in result["cases"]}
    assert list(cases) == ["stock", "none", "fastv@4", "st3:anneal_every=1@4", "parvts@4"]
    for c in cases.values():
        assert len(c["repeats"]["end_to_end_ms"]) == 2  # raw values of every timed round
        m = c["median"]
        for key in ("ttft_ms", "decode_ms_per_token", "end_to_end_ms", "tokens_per_s", "decode_tokens_per_s"):
            assert m[key] > 0
        assert set(c["speedup"]) >= {"measured", "flops_ideal", "roofline_ideal", "measured_over_flops_ideal",
                                     "measured_over_roofline"}
        assert set(c["speedup"]["measured"]) == set(PHASES)
        assert "kind" in c["peak_memory"]
    stock, fastv = cases["stock"], cases["fastv@4"]
    assert stock["speedup"]["flops_ideal"] == {p: 1.0 for p in PHASES}
    assert fastv["visual"]["visual_tokens_per_layer_prefill"][-1] == 4 * 1  # one image per sample
    assert fastv["kv_cache"]["ratio"] < 1.0
    # fewer tokens than the 16 visual tokens -> the decoder does less work in every phase
    for key in ("flops_ideal", "roofline_ideal"):
        for phase in PHASES:
            assert fastv["speedup"][key][phase] > 1.0
    assert cases["st3:anneal_every=1@4"]["speedup"]["flops_ideal"]["end_to_end"] > 1.0
    work = fastv["work"]
    # summed over the batch of 2 identical rows
    assert work["pruned"]["prefill"]["decoder_flops"] == 2 * fastv["flops_per_sample"]["prefill"]["exact"]
    assert work["unpruned"]["decode"]["kv_bytes"] > work["pruned"]["decode"]["kv_bytes"] > 0


def test_bench_overhead_and_scoring(tiny_run):
    result, _ = tiny_run
    ov = result["overhead"]
    assert ov["target_end_to_end_ratio"] == 1.02
    assert ov["end_to_end_ratio"] > 0 and isinstance(ov["within_target"], bool)
    assert ov["end_to_end_ratio_paired_interval"] is None and ov["target_resolved"] is False  # 2 rounds: no interval
    sc = result["scoring"]
    assert sc["none"]["calls_prefill"] == sc["none"]["calls_decode"] == 0
    assert sc["fastv@4"]["calls_prefill"] == 1 and sc["fastv@4"]["calls_decode"] == 0
    assert sc["st3:anneal_every=1@4"]["calls_decode"] > 0 and sc["st3:anneal_every=1@4"]["ms_per_call_decode"] > 0
    assert sc["parvts@4"]["calls_prefill"] >= 1
    layers, new_tokens = 6, result["spec"]["new_tokens"]  # the tiny arch
    # every forward: model pre + forward hook, LM pre + forward hook; the prefill and each decode step on which
    # the method acts also a pre-hook and a listener per layer (ST3 with anneal_every 1: every decode step)
    for name, s in sc.items():
        acting = new_tokens - 1 if name.startswith("st3") else 0
        assert s["hook_calls"] == 4 * new_tokens + 2 * layers * (1 + acting), name
        assert 0 < s["hook_ms"] and 0 < s["wrapper_ms"] and s["host_share_of_stock_end_to_end"] > 0
        assert s["hook_ms"] >= s["total_ms"]  # scoring runs inside the attention listener


# ---------------------------------------------------------------------------------------- a tiny video run
VIDEO_FRAMES = (2, 4)


@pytest.fixture(scope="module")
def tiny_video_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-video")
    argv = ["bench", "--arch", "qwen2.5-vl-tiny", "--video-frames", "4,2", "--methods", "none,fastv,pool",
            "--budgets", "25%", "--prompt-tokens", "12", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
            "--matmul-size", "128", "--copy-mb", "4", "--dtype", "float32", "--out", str(out)]
    assert cli.main(argv) == 0
    return out


def test_video_bench_writes_a_run_per_frame_count_and_a_summary(tiny_video_run, capsys):
    out = tiny_video_run
    stems = [f"bench-b1-p12-n2-v{n}-float32" for n in VIDEO_FRAMES] + ["bench-video-b1-p12-n2-float32"]
    suffixes = (".json", ".md") + ((".png",) if importlib.util.find_spec("matplotlib") is not None else ())
    assert sorted(p.name for p in out.iterdir()) == sorted(stem + suffix for stem in stems for suffix in suffixes)
    for n in VIDEO_FRAMES:
        result = json.loads((out / f"bench-b1-p12-n2-v{n}-float32.json").read_text())
        meta = result["meta"]
        assert (meta["visual_kind"], meta["video_frames"], meta["frame_size"]) == ("video", n, 32)
        assert meta["visual_tokens_per_unit"] == n * QWEN_TINY_FRAME and meta["visual_tokens_per_image"] is None
        assert meta["sequence_length"] == 12 + n * QWEN_TINY_FRAME + 2 and result["spec"]["video_frames"] == n
        cases = {c["name"]: c for c in result["cases"]}
        assert list(cases) == ["stock", "none", "fastv@25%", "pool@25%"]
        fastv = cases["fastv@25%"]
        kept = n * QWEN_TINY_FRAME // 4
        # the report counts the video's tokens as visual tokens, per layer
        assert fastv["visual"]["visual_tokens_per_layer_prefill"][-1] == kept
        assert cases["pool@25%"]["visual"]["visual_tokens_per_layer_prefill"] == [kept] * 6
        assert result["model_work"]["vision_flops"] > 0  # the tower ran on the video
        md = (out / f"bench-b1-p12-n2-v{n}-float32.md").read_text()
        assert f"one video of {n} frames at 32 x 32 px ({n * QWEN_TINY_FRAME} visual tokens)" in md


def test_video_summary_shows_the_saving_growing_with_frames(tiny_video_run):
    summary = json.loads((tiny_video_run / "bench-video-b1-p12-n2-float32.json").read_text())
    assert summary["frames"] == list(VIDEO_FRAMES) and summary["files"] == [
        f"bench-b1-p12-n2-v{n}-float32.md" for n in VIDEO_FRAMES]
    rows = {(r["case"], r["frames"]): r for r in summary["rows"]}
    assert [key for key in rows] == [(c, n) for c in ("stock", "none", "fastv@25%", "pool@25%") for n in VIDEO_FRAMES]
    for r in rows.values():
        assert r["ttft_ms"] > 0 and r["end_to_end_ms"] > 0 and r["ttft_speedup"] > 0 and r["end_to_end_speedup"] > 0
        assert r["visual_tokens"] == r["frames"] * QWEN_TINY_FRAME
    for n in VIDEO_FRAMES:
        assert rows["stock", n]["end_to_end_flops_ideal"] == 1.0 and rows["stock", n]["kv_bytes"] is None
        assert rows["none", n]["decoder_flops_ratio"] == 1.0 and rows["none", n]["kv_ratio"] == 1.0
    for case in ("fastv@25%", "pool@25%"):
        few, many = rows[case, 2], rows[case, 4]
        # a quarter of the video kept: the more frames, the larger the visual share of the work it saves
        assert 1.0 > few["decoder_flops_ratio"] > many["decoder_flops_ratio"]
        assert 1.0 > few["kv_ratio"] > many["kv_ratio"]
        assert 1.0 < few["end_to_end_flops_ideal"] < many["end_to_end_flops_ideal"]
        assert few["end_to_end_roofline_ideal"] > 1.0 and many["end_to_end_roofline_ideal"] > 1.0
    md = (tiny_video_run / "bench-video-b1-p12-n2-float32.md").read_text()
    for text in ("# vtprune bench, video: qwen2.5-vl-tiny", "Saving vs frames", "| fastv@25% | 2 | 16 (",
                 "| pool@25% | 4 | 32 (", "command: `vtprune bench --arch qwen2.5-vl-tiny --video-frames 4,2"):
        assert text in md
