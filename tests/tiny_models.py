"""Writes tiny llama-architecture GGUF models with the `gguf` package, so tests and
benchmarks need no download. A 64-wide, 2-layer model is about half a megabyte.

All models written here share one byte-level (GPT-2 style) tokenizer unless told
otherwise, so any two of them form a valid DeRa pair.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_LAYERS = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_CTX_TRAIN = 512

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's reversible byte-to-printable-character table, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
SPECIALS = ["<s>", "<|im_start|>", "<|im_end|>"]


def tokenizer_vocab() -> tuple[list[str], list[int]]:
    tokens = _byte_alphabet() + [a + b for a, b in MERGES] + SPECIALS
    types = [gguf.TokenType.NORMAL] * (256 + len(MERGES)) + [gguf.TokenType.CONTROL] * len(SPECIALS)
    return tokens, [int(t) for t in types]


def token_id(text: str) -> int:
    return tokenizer_vocab()[0].index(text)


def write_tiny_model(
    path: str | Path,
    seed: int,
    *,
    tokens: list[str] | None = None,
    chat_template: str | None = CHATML,
    logit_scale: float = 0.6,
    architecture: str = "llama",
    matrix_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    context_length: int = N_CTX_TRAIN,
) -> Path:
    """Writes a random-weight llama model; `logit_scale` spreads the logits so that greedy
    choices are rarely near-ties (which would make exactness tests fragile). The block
    matrices are stored as `matrix_type` (e.g. Q8_0 for a quantized model)."""
    path = Path(path)
    base_tokens, types = tokenizer_vocab()
    tokens = tokens or base_tokens
    n_vocab = len(tokens)
    types = (types + [int(gguf.TokenType.NORMAL)] * n_vocab)[:n_vocab]
    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float | None = None) -> np.ndarray:
        std = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * std).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), architecture)

    def add_matrix(name: str, values: np.ndarray) -> None:
        if matrix_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        else:
            packed = gguf.quants.quantize(values, matrix_type)
            writer.add_tensor(name, packed, raw_dtype=matrix_type)

    writer.add_name(f"tiny-llama-{seed}")
    writer.add_context_length(context_length)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    file_types = {gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32}
    writer.add_file_type(file_types.get(matrix_type, gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(tokens.index("<s>") if "<s>" in tokens else 0)
    if "<|im_end|>" in tokens:
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(True)
    if chat_template:
        writer.add_chat_template(chat_template)

    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", weight(n_vocab, N_EMBD, scale=logit_scale))
    head_dim = N_EMBD // N_HEAD
    for i in range(N_LAYERS):
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        add_matrix(f"{block}.attn_q.weight", weight(N_EMBD, N_EMBD))
        add_matrix(f"{block}.attn_k.weight", weight(N_HEAD_KV * head_dim, N_EMBD))
        add_matrix(f"{block}.attn_v.weight", weight(N_HEAD_KV * head_dim, N_EMBD))
        add_matrix(f"{block}.attn_output.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        add_matrix(f"{block}.ffn_gate.weight", weight(N_FF, N_EMBD))
        add_matrix(f"{block}.ffn_up.weight", weight(N_FF, N_EMBD))
        add_matrix(f"{block}.ffn_down.weight", weight(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_lora(path: str | Path, seed: int, *, rank: int = 4, alpha: float = 8.0) -> Path:
    """Writes a LoRA adapter GGUF (llama.cpp's format) for the tiny llama models, on the
    attention query/value and FFN-up projections of every block."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    head_dim = N_EMBD // N_HEAD
    targets = {"attn_q": N_EMBD, "attn_v": N_HEAD_KV * head_dim, "ffn_up": N_FF}
    for i in range(N_LAYERS):
        for name, n_out in targets.items():
            a = (rng.standard_normal((rank, N_EMBD)) / np.sqrt(N_EMBD)).astype(np.float32)
            b = (rng.standard_normal((n_out, rank)) * 0.5).astype(np.float32)
            writer.add_tensor(f"blk.{i}.{name}.weight.lora_a", a)
            writer.add_tensor(f"blk.{i}.{name}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_merged(
    reference: str | Path,
    adapter: str | Path | None,
    path: str | Path,
    *,
    matrix_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    norm_shift: float = 0.0,
) -> Path:
    """The reference with a LoRA adapter merged into its weights, W + (alpha / r) * B A,
    as a full model (its matrices stored as `matrix_type`): a "fully fine-tuned" model
    whose difference from the reference is exactly low-rank. `norm_shift` is added to
    every vector (the norm weights), which a full fine-tune also changes; with no
    adapter, the norm weights are all that differs."""
    from gguf.quants import dequantize, quantize

    path = Path(path)
    base = gguf.GGUFReader(str(reference))
    deltas = {}
    lora = None if adapter is None else gguf.GGUFReader(str(adapter))
    alpha = 0.0 if lora is None else float(lora.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    lora_tensors = (
        {} if lora is None else {t.name: np.asarray(t.data, dtype=np.float32) for t in lora.tensors}
    )
    for name, a in lora_tensors.items():
        if name.endswith(".lora_a"):
            target = name.removesuffix(".lora_a")
            b = lora_tensors[f"{target}.lora_b"]
            deltas[target] = (alpha / a.shape[0]) * (b @ a)
    writer = gguf.GGUFWriter(str(path), base.fields["general.architecture"].contents())
    for key, field in base.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in base.tensors:
        values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        values += deltas.get(tensor.name, 0.0)
        if values.ndim == 1:
            values += norm_shift
        if values.ndim == 2 and matrix_type != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, quantize(values, matrix_type), raw_dtype=matrix_type)
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
