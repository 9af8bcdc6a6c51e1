"""``scripts/gpu_check.sh --dry-run``: the GPU check's steps on the CPU with the bench's tiny architectures, so that
the script a lent GPU machine runs (docs/gpu-check.md) cannot rot between loans: every step passes and writes
what the GPU run writes, within the 8 files a lent machine sends back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import transformers
from families import FAMILIES, METHODS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
FILES = ["bench.md", "bench.tar.gz", "cuda-tests.txt", "cuda-tests.xml", "env.txt", "gpu-check.log"]
# regime -> (batch, new tokens) of the dry run
REGIMES = {"a": (1, 1), "b": (1, 4), "c": (16, 4)}
VIDEO_FRAMES = (2, 4)  # regime (v), the tiny Qwen2.5-VL: 8 visual tokens per frame

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_script(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args, "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_dry_run_runs_every_step_and_writes_what_the_gpu_run_writes(tmp_path):
    out = tmp_path / "out"
    proc = run_script("--dry-run", out=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == FILES  # <= 8 files: what a lent machine sends back

    env = (out / "env.txt").read_text()
    assert f"torch: {torch.__version__}" in env and f"transformers: {transformers.__version__}" in env
    assert "cuda available: False" in env and "date_utc: " in env and "mode: dry run" in env

    log = (out / "gpu-check.log").read_text()
    for step in ("env", "cuda-tests", "bench-a", "bench-b", "bench-c", "bench-v"):
        assert f"step {step}: ok in " in log, step
    assert "every step passed" in log

    # the CUDA tests were collected, every one of them, and skipped for want of a device
    suite = ET.parse(out / "cuda-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    # families x (sdpa bf16, sdpa fp16, fa2 bf16) x (2 tests per method + the tolerance's own test)
    cases = len(FAMILIES) * 3 * (2 * len(METHODS) + 1)
    assert int(suite.get("tests")) == int(suite.get("skipped")) == cases
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0
    assert "no CUDA device" in (out / "cuda-tests.txt").read_text()

    md = (out / "bench.md").read_text()
    with tarfile.open(out / "bench.tar.gz") as tar:
        names = tar.getnames()
        for regime, (batch, new) in REGIMES.items():
            assert f"<!-- regime ({regime}) -->" in md
            stem = f"bench-{regime}/bench-b{batch}-p60-n{new}-float32"
            assert f"{stem}.md" in names
            result = json.load(tar.extractfile(f"{stem}.json"))
            assert result["spec"]["batch"] == batch and result["spec"]["new_tokens"] == new
            methods = {c["method"] for c in result["cases"]}
            assert methods == set(METHODS) | {"stock"}
            assert all(c["peak_memory"]["peak_bytes"] for c in result["cases"])
            assert all(c["speedup"]["measured_over_roofline"]["end_to_end"] for c in result["cases"])
        # (v): one run per frame count of the video, every method, and the summary over frame counts
        assert "<!-- regime (v) -->" in md
        for frames in VIDEO_FRAMES:
            result = json.load(tar.extractfile(f"bench-v/bench-b1-p60-n1-v{frames}-float32.json"))
            assert result["meta"]["visual_kind"] == "video" and result["meta"]["visual_tokens_per_unit"] == 8 * frames
            assert {c["method"] for c in result["cases"]} == set(METHODS) | {"stock"}
        summary = json.load(tar.extractfile("bench-v/bench-video-b1-p60-n1-float32.json"))
        assert summary["frames"] == list(VIDEO_FRAMES)
        assert {r["case"] for r in summary["rows"]} == {"stock"} | {f"{m}@25%" for m in METHODS if m != "none"} | {"none"}
    assert md.count("# vtprune bench: tiny") == 3 and "measured / roofline" in md
    # the video summary first, then each frame count's tables
    assert md.index("# vtprune bench, video: qwen2.5-vl-tiny") < md.index("# vtprune bench: qwen2.5-vl-tiny")
    assert md.count("# vtprune bench: qwen2.5-vl-tiny") == len(VIDEO_FRAMES)


def test_unknown_argument_is_refused(tmp_path):
    proc = run_script("--nope", out=tmp_path)
    assert proc.returncode == 2
    assert "unknown argument '--nope'; accepted: --dry-run, --out DIR, --help" in proc.stderr
