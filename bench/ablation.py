"""What each CPU optimisation gives: `python -m bench.ablation [--texts N]`.

Each step runs the MLX engine on the same corpus in a fresh process (the BLAS is chosen at
process start), adding one change at a time; sentence-transformers runs in the same
invocation for scale. Not part of `make bench` (the reference-BLAS step alone takes minutes
per thousand texts); docs/performance.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (label, BLAS: none | preload | auto, batch tokens, kernels, worker processes)
STEPS: list[tuple[str, str, int, str, int]] = [
    ("MLX as shipped (bundled reference BLAS)", "none", 8192, "mlx", 0),
    ("+ Debian OpenBLAS preloaded (its own CPU detection)", "preload", 8192, "mlx", 0),
    ("+ OPENBLAS_CORETYPE from the CPU flags (blas.py)", "auto", 8192, "mlx", 0),
    ("+ fast GELU and softmax (fast_math.py)", "auto", 8192, "fast", 0),
    ("+ 512-token batches", "auto", 512, "fast", 0),
    ("+ 2 engine worker processes, 1 BLAS thread each", "auto", 512, "fast", 2),
]  # fmt: skip


def step_env(blas_mode: str) -> dict[str, str]:
    from akidb_embed.host import blas

    from .reference import clean_env
    from .served import repo_env

    env = clean_env() | repo_env(REPO)
    library = blas.openblas_library()
    if blas_mode == "none" or library is None:
        return env
    if blas_mode == "preload":
        return env | {"LD_PRELOAD": str(library), blas.REEXEC_GUARD: "1"}
    return blas.blas_env(env, library)


def use_mlx_builtin_kernels() -> None:
    """Swap fast_math's GELU and softmax for MLX's erf and softmax (what bert.py used)."""
    import mlx.core as mx

    from akidb_embed.modeling.models import bert, fast_math

    def softmax_parts(scores: mx.array) -> tuple[mx.array, mx.array]:
        return mx.softmax(scores, axis=-1, precise=True), mx.ones((*scores.shape[:-1], 1))

    def gelu(x: mx.array) -> mx.array:
        return 0.5 * x * (1 + mx.erf(x * (2**-0.5)))

    fast_math.softmax_parts = softmax_parts  # type: ignore[assignment]
    bert._ACTIVATIONS["gelu"] = gelu


def child(texts_file: str, batch_tokens: int, kernels: str, workers: int) -> None:
    from akidb_embed.runtime.backend import describe_backend

    if kernels == "mlx":
        use_mlx_builtin_kernels()
    from akidb_embed.modeling.engine import EmbedOptions
    from akidb_embed.modeling.loader import load_engine
    from akidb_embed.store.registry import bundled_minilm_dir

    from . import engine_bench

    model_dir = bundled_minilm_dir()
    assert model_dir is not None
    texts = json.loads(Path(texts_file).read_text())
    engine = load_engine(model_dir, name="m", source="m", revision="ablation")
    ids = [t.ids for t in engine.tokenize(texts, EmbedOptions())]
    if workers:
        spec = engine_bench.model_spec("m", model_dir)
        run = engine_bench.run_pool(spec, ids, 384, batch_tokens, workers)
    else:
        run = engine_bench.run_in_process(engine, ids, batch_tokens)
    print(json.dumps({"texts_per_second": run.texts_per_second, "backend": describe_backend()}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__)
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--reference-texts", type=int, default=40, help="for the slow first step")
    parser.add_argument("--steps", default="", help="comma-separated step numbers (1-based)")
    args = parser.parse_args(argv)
    from . import corpus, reference

    texts = corpus.sample(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        st = reference.run_reference(texts, workdir)
        print(f"{'sentence-transformers (torch CPU)':55s} {st.texts_per_second:7.1f} texts/s")
        chosen = {int(n) for n in args.steps.split(",") if n} or set(range(1, len(STEPS) + 1))
        for number, (label, blas_mode, batch_tokens, kernels, workers) in enumerate(STEPS, 1):
            if number not in chosen:
                continue
            subset = texts[: args.reference_texts] if "as shipped" in label else texts
            texts_file = workdir / f"texts-{len(subset)}.json"
            texts_file.write_text(json.dumps(subset))
            command = [sys.executable, "-m", "bench.ablation", "--child", str(texts_file)]
            command += [str(batch_tokens)]
            command += [kernels, str(workers)]
            started = time.perf_counter()
            done = subprocess.run(
                command, env=step_env(blas_mode), capture_output=True, text=True, check=True
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{label:55s} {result['texts_per_second']:7.1f} texts/s "
                f"({result['backend']}; {len(subset)} texts, {time.perf_counter() - started:.0f}s)"
            )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(main())
