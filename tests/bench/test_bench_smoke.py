"""`make bench` in its quick mode, so the benchmark cannot rot: it runs end to end, and what
it reports is self-consistent (the numbers themselves are the benchmark's business)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.reference
def test_quick_bench_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    paths = [str(REPO / "server"), str(REPO / "clients" / "python"), str(REPO)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert "texts/s" in done.stdout and "sentence-transformers" in done.stdout

    assert results["corpus"]["count"] == 48
    assert results["corpus"]["p10"] <= results["corpus"]["p50"] <= results["corpus"]["max"]
    assert results["sentence_transformers"]["texts_per_second"] > 0
    wire_bytes = {e["encoding"]: e["wire_bytes_per_vector"] for e in results["encodings"]}
    assert wire_bytes["binary"] < wire_bytes["int8"] < wire_bytes["float16"] < wire_bytes["float32"]
    for key in ("engine_in_process", "served_stream", "served_embed_64", "served_8_clients"):
        entry = results[key]
        assert entry["texts_per_second"] > 0, key
        assert entry["parity"]["min_cosine"] >= 0.9999, (key, entry["parity"])
        assert entry["parity"]["max_abs_error"] < 1e-4, (key, entry["parity"])
        expected = entry["texts_per_second"] / results["sentence_transformers"]["texts_per_second"]
        assert entry["vs_sentence_transformers"] == pytest.approx(expected)
    for case in ("latency_idle", "latency_under_load", "latency_under_load_paced"):
        assert 0 < results[case]["p50_ms"] <= results[case]["p99_ms"], case
    assert results["rss"]["before_bytes"] > 0 and results["rss"]["after_bytes"] > 0
    assert results["flop_bound"]["gemm_gflops"] > 0
    assert {w["dimensions"] for w in results["wire"]} == {384, 1024}
    assert results["backend"].startswith(("cpu", "gpu"))
    ceiling = results["ceiling"]
    for key in (
        "stream_coalesced_items_per_second",
        "stream_one_item_per_message_items_per_second",
        "embed_256_items_per_second",
        "embed_256_4_in_flight_items_per_second",
        "echo_one_item_per_message_items_per_second",
    ):
        assert ceiling[key] > 0, key
    # What each ceiling row cost in CPU, and the rate that CPU would fill the cores at.
    assert set(ceiling["cpu"]) == {
        "stream_coalesced",
        "stream_one_item_per_message",
        "embed_256",
        "embed_256_4_in_flight",
    }
    for key, use in ceiling["cpu"].items():
        assert use["us_per_item"] > 0 and use["cores_busy"] > 0, key
        cores = results["machine"]["cores"]
        assert use["bound_items_per_second"] == pytest.approx(cores / use["us_per_item"] * 1e6)
    assert "serving ceiling" in done.stdout and "CPU per item" in done.stdout
    assert "the path adds" in done.stdout
    floor = ceiling["floor"]
    assert floor["tokenize_us_per_item"] > 0 and floor["compute_us_per_item"] > 0
    per_item = (floor["tokenize_us_per_item"] + floor["compute_us_per_item"]) / 1e6
    assert floor["bound_items_per_second"] == pytest.approx(results["machine"]["cores"] / per_item)
    assert "fill every core" in done.stdout
    for case in (
        "engine_query",
        "engine_workers_query",
        "echo_query",
        "ceiling_query",
        "ceiling_engine_query",
    ):
        assert 0 < results[case]["p50_ms"] <= results[case]["p99_ms"], case
    assert "in an engine worker process (no gRPC)" in done.stdout
    for case in ("latency_under_load", "latency_under_load_paced"):
        load = results[case]
        assert load["bulk_alone_tokens_per_second"] > 0 and load["bulk_tokens_per_second"] > 0
        expected = load["bulk_tokens_per_second"] / load["bulk_alone_tokens_per_second"]
        assert load["bulk_vs_alone"] == pytest.approx(expected)
    assert results["latency_under_load_paced"]["queries_per_second"] == pytest.approx(10)
    assert "queries/s: p50" in done.stdout
    # bf16 rows where oneDNN can run them here, else the reason they were left out.
    from akidb_embed.modeling import cpu_bf16

    if cpu_bf16.runnable():
        assert results["bf16"]["targets"]["served_bf16_min_cosine"] >= 0.999
    else:
        assert results["bf16"] == {"skipped": cpu_bf16.unavailable_reason()}
        assert "bf16 on the CPU: skipped" in done.stdout
