"""Speed and memory of each precision choice for a decoder checkpoint on this machine.

Builds a Qwen3-Embedding-0.6B-shaped model (real widths and vocabulary, fewer layers) with
random weights, as a bfloat16 checkpoint and as a 4-bit mlx-lm one (group size 64), then
loads each under each AKIDB_EMBED_DEQUANTIZE / AKIDB_EMBED_UPCAST choice in a fresh process
and times a batch and a single query. Run it with OpenBLAS preloaded, as the server runs:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
      PYTHONPATH=server python bench/precision_choices.py [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN3_06B = {
    "model_type": "qwen3",
    "vocab_size": 151669,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "pad_token_id": 151643,
}
VARIANTS = [  # (checkpoint, AKIDB_EMBED_DEQUANTIZE, AKIDB_EMBED_UPCAST)
    ("bf16", "auto", "auto"),
    ("bf16", "auto", "never"),
    ("q4", "auto", "auto"),
    ("q4", "never", "auto"),
    ("q4", "never", "never"),
]


def build(root: Path, layers: int) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map
    from tokenizers import Tokenizer, models

    from akidb_embed.modeling.models import qwen3

    config = {**QWEN3_06B, "num_hidden_layers": layers}
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    mx.random.seed(0)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.parameters()))
    model.set_dtype(mx.bfloat16)
    vocab = {f"w{i}": i for i in range(1000)} | {"<|endoftext|>": 151643, "[UNK]": 151644}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    for name, quantize in (("bf16", False), ("q4", True)):
        directory = root / name
        directory.mkdir()
        if quantize:
            nn.quantize(model, group_size=64, bits=4)
            config["quantization"] = {"group_size": 64, "bits": 4}
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(directory / "model.safetensors"), weights)
        (directory / "config.json").write_text(json.dumps(config))
        tokenizer.save(str(directory / "tokenizer.json"))


def measure(directory: Path, batch: int, tokens: int, repeats: int) -> dict[str, float | str]:
    import mlx.core as mx
    import psutil

    from akidb_embed.modeling.loader import load_engine

    start = time.perf_counter()
    engine = load_engine(directory, name="bench", source="bench", revision="bench")
    load_s = time.perf_counter() - start
    rss = psutil.Process().memory_info().rss
    rows = [[(7 * i + j) % 1000 for j in range(tokens)] for i in range(batch)]
    query = [[(3 * j) % 1000 for j in range(16)]]
    engine.forward(rows[:1])  # warm up

    def best(work: list[list[int]]) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            engine.forward(work)
            times.append(time.perf_counter() - t)
        return min(times)

    return {
        "dtype": engine.profile.dtype,
        "load_s": load_s,
        "params_mb": engine.memory_bytes / 2**20,
        "rss_mb": rss / 2**20,
        "peak_rss_mb": psutil.Process().memory_info().rss / 2**20,
        "batch_ms": 1000 * best(rows),
        "query_ms": 1000 * best(query),
        "mx_peak_mb": mx.get_peak_memory() / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="of the real 28")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.batch, args.tokens, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.layers)
        print(f"Qwen3-0.6B shapes, {args.layers} layers, batch {args.batch}x{args.tokens} tokens")
        print(
            "| checkpoint | DEQUANTIZE | UPCAST | computes | load s | params MB | RSS MB "
            "| batch ms | 16-token query ms |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for checkpoint, dequantize, upcast in VARIANTS:
            env = os.environ | {"AKIDB_EMBED_DEQUANTIZE": dequantize, "AKIDB_EMBED_UPCAST": upcast}
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(root / checkpoint),
                 "--batch", str(args.batch), "--tokens", str(args.tokens),
                 "--repeats", str(args.repeats)],
                env=env, check=True, capture_output=True, text=True,
            )  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {checkpoint} | {dequantize} | {upcast} | {r['dtype']} | {r['load_s']:.1f} "
                f"| {r['params_mb']:.0f} | {r['rss_mb']:.0f} | {r['batch_ms']:.0f} "
                f"| {r['query_ms']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
