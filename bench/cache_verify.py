"""Benchmark: what verifying the prepared-data cache costs (sizes and SHA-256 of every file, before each reuse).

The baseline is the same cache hit without verification (prmkit before checksums were recorded). Also timed: the
cold prepare that writes the cache (which now hashes what it wrote), and the hashing alone on each side.
In-process, after one warm-up, so imports and the tokenizer load are not counted.

    python bench/cache_verify.py --rows 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import QWEN2_TOKENIZER, make_rows, write_jsonl


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not QWEN2_TOKENIZER.exists():
        raise SystemExit(f"needs the Qwen2 tokenizer at {QWEN2_TOKENIZER} (../shared)")

    import prmkit.core.atomic as atomic
    import prmkit.data.prepare as dataset
    from prmkit.config.load import load_config
    from prmkit.models.loading import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="prmkit-bench-cache-"))
    os.environ["PRMKIT_CACHE"] = str(work / "cache")
    src = write_jsonl(make_rows(args.rows), work / "rows.jsonl")
    cfg = load_config(None, None, {"model.tokenizer": str(QWEN2_TOKENIZER), "data.train": str(src)})
    tok = load_tokenizer(str(QWEN2_TOKENIZER))

    start = time.perf_counter()
    prepared = dataset.prepare_splits(cfg, tok)
    cold = time.perf_counter() - start
    files = prepared.metadata["files"]
    size = sum(f["size"] for f in files.values())

    def hit() -> float:
        start = time.perf_counter()
        again = dataset.prepare_splits(cfg, tok)
        assert again.cache_hit
        return time.perf_counter() - start

    real_verify = dataset.verify_prepared
    verified, unverified, verify_only, manifest_only = [], [], [], []
    for _ in range(args.repeats):
        verified.append(hit())
        dataset.verify_prepared = lambda target, metadata: None
        unverified.append(hit())
        dataset.verify_prepared = real_verify
        start = time.perf_counter()
        assert real_verify(prepared.path, prepared.metadata) is None
        verify_only.append(time.perf_counter() - start)
        start = time.perf_counter()
        atomic.manifest(prepared.path)
        manifest_only.append(time.perf_counter() - start)

    result = {
        "rows": args.rows,
        "cache_mb": round(size / 1e6, 1),
        "files": len(files),
        "cold_prepare_seconds": round(cold, 3),
        "cache_hit_unverified_seconds": round(median(unverified), 3),
        "cache_hit_verified_seconds": round(median(verified), 3),
        "verify_seconds": round(median(verify_only), 3),
        "verify_mb_per_s": round(size / 1e6 / median(verify_only)),
        "hash_on_write_seconds": round(median(manifest_only), 3),
        "verify_share_of_cold_prepare": round(median(verify_only) / cold, 4),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "repeats": args.repeats,
    }
    out = Path(__file__).resolve().parent / "results" / "cache_verify.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
