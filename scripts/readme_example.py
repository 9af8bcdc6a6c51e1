"""The measured example of docs/results.md: ParVTS, ST3 and FastV against the unpruned bundled model on real photos.

Runs ``vtprune generate --compare --json`` (the CLI users run) for each method and photo, writes the raw
JSON under ``benchmarks/results/<date>-<host>-readme-example/`` and prints a Markdown table of answers,
visual tokens, FLOPs / KV ratios and CPU timings (ms).

    .venv/bin/python scripts/readme_example.py [--photos a.jpg b.jpg] [--max-new-tokens 24]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
RUNS = [("parvts", ["--budget", "49"]), ("st3", []), ("fastv", ["--budget", "49"])]


def run_one(photo: Path, prompt: str, method: str, extra: list[str], max_new: int) -> dict:
    cmd = [sys.executable, "-m", "vtprune.cli", "generate", "--image", str(photo), "--prompt", prompt,
           "--method", method, *extra, "--max-new-tokens", str(max_new), "--compare", "--json"]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", nargs="*", default=[str(PHOTOS / "COCO_val2017_000000039769_two_cats.jpg")])
    ap.add_argument("--prompt", default="What is in the image?")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    stamp = datetime.date.today().isoformat()
    out_dir = ROOT / "benchmarks" / "results" / f"{stamp}-{platform.node() or 'host'}-readme-example"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for photo in map(Path, args.photos):
        for method, extra in RUNS:
            result = run_one(photo, args.prompt, method, extra, args.max_new_tokens)
            (out_dir / f"{photo.stem}-{method}.json").write_text(json.dumps(result, indent=1))
            rows.append((photo.name, result))
    print(f"date {stamp}, device {rows[0][1]['timing']['device']}, {platform.processor() or platform.machine()}, "
          f"torch threads default, prompt {args.prompt!r}, greedy, {args.max_new_tokens} new tokens max\n")
    print("| photo | method | answer (unpruned) | visual tokens in → equiv. → final | prefill FLOPs (exact) | total FLOPs (FastV) | KV bytes | prefill ms (unpruned) | prefill speedup | decode ms/token (unpruned) | new tokens (unpruned) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        b, t, bt = r["baseline"], r["timing"], r["baseline"]["timing"]
        opts = {k: v for k, v in r["options"].items() if k in ("budget", "keep_ratio", "ratio_used", "discard_layer", "layer")}
        print(f"| {name} | {r['method']} {json.dumps(opts)} | {r['answer']!r} ({b['answer']!r}) "
              f"| {r['visual_tokens_in']} → {r['equivalent_budget']:.1f} → {r['final_budget']} "
              f"| {r['flops']['prefill']['exact_ratio']:.1%} | {r['flops']['total_fastv_ratio']:.1%} | {r['kv_cache']['ratio']:.1%} "
              f"| {t['prefill_ms']:.0f} ({bt['prefill_ms']:.0f}) | {r['speedup']['prefill']:.2f}x "
              f"| {_ms(t['decode_ms_per_token'])} ({_ms(bt['decode_ms_per_token'])}) | {t['new_tokens']} ({bt['new_tokens']}) |")
    print(f"\nraw JSON: {out_dir.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
