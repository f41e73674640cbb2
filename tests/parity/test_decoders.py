"""Decoder embedding models (Qwen3-Embedding, EmbeddingGemma) against transformers.

The served engine (loader + forward + finish) is compared with transformers plus the
reference pooling: explicit last-token pooling for Qwen3, sentence-transformers (pooling,
Dense, Normalize) for Gemma, on tiny random checkpoints (tests/fixtures/tiny_models.py).
Run with `-s` to see the measured cosine and max abs error of each case.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Tokenizer

from akidb_embed.errors import InvalidArgument, ModelLoadError
from akidb_embed.modeling.engine import EmbeddingEngine, EmbedOptions, PromptKind, finish
from akidb_embed.modeling.loader import load_engine
from akidb_embed.modeling.models import gemma3_text, qwen3
from akidb_embed.modeling.precision import Choice, PrecisionPolicy
from akidb_embed.modeling.tokenization import TextTokenizer, Truncation
from tests.fixtures import tiny_models as tiny

COSINE_MIN = 0.9999
MAX_ABS = 1e-4  # float32 everywhere: measured errors are ~1e-7
BATCH_INVARIANCE = 1e-5
TEXTS = tiny.sample_texts(8, seed=0)  # 1 to 60 words; Gemma's band is 5 tokens


@dataclass(frozen=True)
class Dirs:
    qwen3: Path
    qwen3_old_tokenizer: Path
    qwen3_bf16: Path
    gemma: Path
    qwen3_q4: Path
    qwen3_q4_ref: Path
    gemma_q4: Path
    gemma_q4_ref: Path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Dirs:
    root = tmp_path_factory.mktemp("decoders")
    qwen = tiny.build_qwen3(root / "qwen3")
    gemma = tiny.build_gemma3(root / "gemma")
    qwen_q4 = tiny.quantize_copy(qwen, root / "qwen3-q4")
    gemma_q4 = tiny.quantize_copy(gemma, root / "gemma-q4", fold_dense=True)
    return Dirs(
        qwen3=qwen,
        qwen3_old_tokenizer=tiny.build_qwen3(
            root / "qwen3-old", eos_in_tokenizer=False, sentence_transformers_files=False
        ),
        qwen3_bf16=tiny.build_qwen3(root / "qwen3-bf16", dtype=mx.bfloat16),
        gemma=gemma,
        qwen3_q4=qwen_q4,
        qwen3_q4_ref=tiny.dequantized_reference(qwen_q4, root / "qwen3-q4-ref"),
        gemma_q4=gemma_q4,
        gemma_q4_ref=tiny.dequantized_reference(gemma_q4, root / "gemma-q4-ref"),
    )


def engine_for(path: Path, policy: PrecisionPolicy | None = None) -> EmbeddingEngine:
    return load_engine(
        path,
        name=path.name,
        source=str(path),
        revision="test",
        precision=policy or PrecisionPolicy(),
    )


def served(
    engine: EmbeddingEngine, texts: Sequence[str], options: EmbedOptions | None = None
) -> np.ndarray:
    """Normalised vectors for `texts`, all in one forward batch."""
    opts = options or EmbedOptions()
    ids = [t.ids for t in engine.tokenize(texts, opts)]
    dims = engine.profile.check_dimensions(opts.dimensions)
    return np.stack([finish(v, dims, opts.normalize) for v in engine.forward(ids)])


def served_one_by_one(engine: EmbeddingEngine, texts: Sequence[str]) -> np.ndarray:
    return np.concatenate([served(engine, [t]) for t in texts])


def compare(case: str, ours: np.ndarray, reference: np.ndarray) -> None:
    cosine = (ours * reference).sum(axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    )
    max_abs = float(np.abs(ours - reference).max())
    print(f"\n{case}: cosine min {cosine.min():.8f}, max abs {max_abs:.2e}")
    assert cosine.min() >= COSINE_MIN, case
    assert max_abs <= MAX_ABS, case


# --- the reference: transformers (CPU torch) ----------------------------------------------


@pytest.fixture(scope="module")
def torch() -> Any:
    """The reference stack; tests that take this fixture skip without it."""
    pytest.importorskip("transformers")
    pytest.importorskip("sentence_transformers")
    return pytest.importorskip("torch")


def transformers_last_token(
    path: Path, texts: Sequence[str], padding_side: str, *, append_eos: bool = False
) -> np.ndarray:
    """transformers' Qwen3Model + last-token pooling + L2 normalisation."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.padding_side = padding_side
    ids = [tokenizer(t)["input_ids"] for t in texts]
    if append_eos:  # the Qwen3-Embedding recipe for tokenizers that do not add it
        ids = [[*row, tokenizer.eos_token_id] for row in ids]
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    model, info = AutoModel.from_pretrained(
        str(path), dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    if padding_side == "left":
        pooled = hidden[:, -1]
    else:
        last = batch["attention_mask"].sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0]), last]
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def sentence_transformers_encode(
    path: Path, texts: Sequence[str], padding_side: str, prompt_name: str | None = None
) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    model.tokenizer.padding_side = padding_side
    vectors = model.encode(list(texts), batch_size=len(texts), prompt_name=prompt_name)
    return np.asarray(vectors)


# --- parity ----------------------------------------------------------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_qwen3_matches_transformers(dirs: Dirs, torch: Any, padding_side: str) -> None:
    engine = engine_for(dirs.qwen3)
    reference = transformers_last_token(dirs.qwen3, TEXTS, padding_side)
    compare(f"qwen3 fp32 batch=8 vs {padding_side}-padded", served(engine, TEXTS), reference)
    compare(
        f"qwen3 fp32 batch=1 vs {padding_side}-padded", served_one_by_one(engine, TEXTS), reference
    )


@pytest.mark.reference
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_gemma_matches_sentence_transformers(dirs: Dirs, torch: Any, padding_side: str) -> None:
    engine = engine_for(dirs.gemma)
    reference = sentence_transformers_encode(dirs.gemma, TEXTS, padding_side)
    assert max(len(t.ids) for t in engine.tokenize(TEXTS, EmbedOptions())) > 4 * engine.model.band
    compare(f"gemma fp32 batch=8 vs {padding_side}-padded", served(engine, TEXTS), reference)
    compare(
        f"gemma fp32 batch=1 vs {padding_side}-padded", served_one_by_one(engine, TEXTS), reference
    )

    # The comparison can fail: without the sliding band the vectors are measurably wrong.
    engine.model.band = 10**6
    wrong = served(engine, TEXTS)
    assert (wrong * reference).sum(axis=1).min() < COSINE_MIN


@pytest.mark.reference
def test_gemma_prompts_match_sentence_transformers(dirs: Dirs, torch: Any) -> None:
    engine = engine_for(dirs.gemma)
    assert engine.profile.prompts == tiny.GEMMA_PROMPTS
    for name in ("query", "document"):
        reference = sentence_transformers_encode(dirs.gemma, TEXTS, "right", prompt_name=name)
        ours = served(engine, TEXTS, EmbedOptions(prompt_kind=PromptKind.NAME, prompt_value=name))
        compare(f"gemma prompt {name!r}", ours, reference)


@pytest.mark.reference
def test_qwen3_old_tokenizer_gets_eos_appended(dirs: Dirs, torch: Any) -> None:
    engine = engine_for(dirs.qwen3_old_tokenizer)
    eos = engine.tokenizer.token_id(tiny.QWEN_EOS)
    assert all(t.ids[-1] == eos for t in engine.tokenize(TEXTS, EmbedOptions()))
    reference = transformers_last_token(dirs.qwen3_old_tokenizer, TEXTS, "left", append_eos=True)
    compare("qwen3 tokenizer without EOS (appended)", served(engine, TEXTS), reference)


@pytest.mark.reference
def test_qwen3_bfloat16_checkpoint_runs_in_float32_on_cpu(dirs: Dirs, torch: Any) -> None:
    engine = engine_for(dirs.qwen3_bf16)
    assert engine.profile.dtype == "bfloat16->float32"
    inner = engine.model.model  # type: ignore[attr-defined]
    assert inner.embed_tokens.weight.dtype == mx.bfloat16  # kept: lookups are cast instead
    assert inner.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    reference = transformers_last_token(dirs.qwen3_bf16, TEXTS, "left")  # bf16 values, fp32 math
    compare("qwen3 bf16 checkpoint (upcast)", served(engine, TEXTS), reference)


@pytest.mark.reference
@pytest.mark.parametrize("dequantize", [Choice.AUTO, Choice.NEVER])
@pytest.mark.parametrize("model", ["qwen3", "gemma"])
def test_quantized_matches_dequantized_reference(
    dirs: Dirs, torch: Any, model: str, dequantize: Choice
) -> None:
    quantized, dequantized = (
        (dirs.qwen3_q4, dirs.qwen3_q4_ref)
        if model == "qwen3"
        else (dirs.gemma_q4, dirs.gemma_q4_ref)
    )
    engine = engine_for(quantized, PrecisionPolicy(dequantize=dequantize))
    computed = "float32" if dequantize is Choice.AUTO else "q4+q8"
    assert engine.profile.dtype in {f"q4+q8->{computed}", computed}
    if model == "qwen3":
        reference = transformers_last_token(dequantized, TEXTS, "left")
    else:
        reference = sentence_transformers_encode(dequantized, TEXTS, "right")
    compare(
        f"{model} q4 (dequantize={dequantize.value}) vs dequantised",
        served(engine, TEXTS),
        reference,
    )


# --- no reference needed -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["qwen3", "gemma"])
def test_a_text_gets_the_same_vector_in_any_batch(dirs: Dirs, model: str) -> None:
    engine = engine_for(dirs.qwen3 if model == "qwen3" else dirs.gemma)
    alone = served_one_by_one(engine, TEXTS)
    rng = np.random.default_rng(7)
    longest = "word " * 120
    for _ in range(3):
        order = rng.permutation(len(TEXTS))
        batch = [TEXTS[i] for i in order] + [longest]
        together = served(engine, batch)[: len(TEXTS)]
        worst = float(np.abs(together - alone[order]).max())
        assert worst <= BATCH_INVARIANCE, f"{model}: {worst:.2e}"


def test_qwen3_matryoshka_any_size_from_32(dirs: Dirs) -> None:
    engine = engine_for(dirs.qwen3)
    assert engine.profile.min_dimensions == 32 and engine.profile.dimensions == 64
    full = served(engine, TEXTS, EmbedOptions(normalize=False))
    for dims in (32, 48, 64):
        short = served(engine, TEXTS, EmbedOptions(dimensions=dims))
        expected = full[:, :dims] / np.linalg.norm(full[:, :dims], axis=1, keepdims=True)
        np.testing.assert_allclose(short, expected, atol=1e-6)
    with pytest.raises(InvalidArgument, match="from 32 to 64"):
        engine.profile.check_dimensions(16)


def test_gemma_matryoshka_sizes(dirs: Dirs) -> None:
    engine = engine_for(dirs.gemma)
    assert engine.profile.dimensions == 768
    assert engine.profile.matryoshka_dimensions == (512, 256, 128)
    for dims in (768, 512, 256, 128):
        assert served(engine, TEXTS[:2], EmbedOptions(dimensions=dims)).shape == (2, dims)
    with pytest.raises(InvalidArgument, match="128, 256, 512"):
        engine.profile.check_dimensions(300)


def test_qwen3_instruction_and_default_prompts(dirs: Dirs) -> None:
    engine = engine_for(dirs.qwen3_old_tokenizer)  # no config_sentence_transformers.json
    assert engine.profile.prompts == tiny.QWEN_PROMPTS  # the architecture's defaults
    instructed = EmbedOptions(prompt_kind=PromptKind.INSTRUCTION, prompt_value="Find the cat")
    assert engine.prefix(instructed) == "Instruct: Find the cat\nQuery:"
    literal = EmbedOptions(prompt_kind=PromptKind.LITERAL, prompt_value=engine.prefix(instructed))
    np.testing.assert_array_equal(served(engine, TEXTS, instructed), served(engine, TEXTS, literal))
    assert not np.allclose(served(engine, TEXTS, instructed), served(engine, TEXTS))
    assert engine_for(dirs.gemma).profile.instruction_template is None


def test_qwen3_eos_survives_truncation(dirs: Dirs) -> None:
    raw = Tokenizer.from_file(str(dirs.qwen3_old_tokenizer / "tokenizer.json"))
    qwen3.prepare_tokenizer(raw)
    eos = raw.token_to_id(tiny.QWEN_EOS)
    qwen3.prepare_tokenizer(raw)  # idempotent: a second call appends nothing more
    for policy in (Truncation.END, Truncation.START):
        [text] = TextTokenizer(raw, max_tokens=6).encode([TEXTS[0] + " cat dog" * 10], policy)
        assert len(text.ids) == 6 and text.ids[-1] == eos and text.ids[-2] != eos


def test_qwen3_accepts_causal_lm_layout(dirs: Dirs, tmp_path: Path) -> None:
    """`model.`-prefixed keys with an LM head (Qwen3ForCausalLM / mlx-lm) load the same."""
    copy = tmp_path / "qwen3-causal-lm"
    shutil.copytree(dirs.qwen3, copy)
    weights = mx.load(str(copy / "model.safetensors"))
    assert isinstance(weights, dict)
    renamed = {f"model.{k}": v for k, v in weights.items()}
    renamed["lm_head.weight"] = weights["embed_tokens.weight"]
    mx.save_safetensors(str(copy / "model.safetensors"), renamed)
    np.testing.assert_array_equal(
        served(engine_for(copy), TEXTS), served(engine_for(dirs.qwen3), TEXTS)
    )


def edit_config(source: Path, target: Path, **changes: Any) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_unsupported_model_type_names_the_supported_ones(dirs: Dirs, tmp_path: Path) -> None:
    path = edit_config(dirs.qwen3, tmp_path / "llama", model_type="llama")
    with pytest.raises(ModelLoadError, match=r"'llama' is not supported.*bert, gemma3_text, qwen3"):
        engine_for(path)


def test_causal_gemma_is_refused(dirs: Dirs, tmp_path: Path) -> None:
    path = edit_config(dirs.gemma, tmp_path / "gemma-causal", use_bidirectional_attention=False)
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention=true"):
        engine_for(path)


def test_precision_policy_from_environment() -> None:
    assert PrecisionPolicy.from_env({}) == PrecisionPolicy(Choice.AUTO, Choice.AUTO)
    policy = PrecisionPolicy.from_env(
        {"AKIDB_EMBED_DEQUANTIZE": "never", "AKIDB_EMBED_UPCAST": "Always"}
    )
    assert policy == PrecisionPolicy(Choice.NEVER, Choice.ALWAYS)
    with pytest.raises(ModelLoadError, match=r"AKIDB_EMBED_DEQUANTIZE='fp8'.*auto, always, never"):
        PrecisionPolicy.from_env({"AKIDB_EMBED_DEQUANTIZE": "fp8"})


def test_quantized_weights_stay_quantized_when_asked(dirs: Dirs) -> None:
    kept = engine_for(dirs.qwen3_q4, PrecisionPolicy(dequantize=Choice.NEVER))
    dequantized = engine_for(dirs.qwen3_q4)
    assert kept.memory_bytes < dequantized.memory_bytes
    np.testing.assert_allclose(served(kept, TEXTS), served(dequantized, TEXTS), atol=1e-5)


def test_gemma_defaults_without_sentence_transformers_files(dirs: Dirs, tmp_path: Path) -> None:
    """A converted copy with only config, weights (Dense folded in) and tokenizer serves the
    same vectors: mean pooling, the folded Dense layers, normalisation, EmbeddingGemma prompts."""
    bare = tmp_path / "gemma-bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(dirs.gemma_q4 / name, bare / name)
    engine = engine_for(bare)
    assert engine.profile.prompts == gemma3_text.DEFAULT_PROMPTS
    assert engine.profile.dimensions == 768 and len(engine.heads) == 2
    np.testing.assert_array_equal(served(engine, TEXTS), served(engine_for(dirs.gemma_q4), TEXTS))
