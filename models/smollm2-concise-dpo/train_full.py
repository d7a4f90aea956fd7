"""The built-in DPO recipe with every weight trainable: a real full-weight aligned model
for measuring low-rank extraction (`dera-local extract`, bench/extract.py).

Same data (data/pairs.jsonl), same DPO loss, seed and step count as train.py, but no
adapter: the projections, norms and the (tied) token embedding of SmolLM2-135M-Instruct
all train, at a full-fine-tuning learning rate. Writes two F16 GGUFs into OUT_DIR:
`reference.f16.gguf` (the dequantized base, so both sides share one weight type) and
`aligned-full.f16.gguf` (the trained model), with the base's metadata.

    pip install -e ".[train]"
    python models/smollm2-concise-dpo/train_full.py --out-dir ~/.cache/dera-local/bench/full-dpo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from torch_llama import PROJECTIONS, TorchLlama  # noqa: E402
from train import END_OF_TURN, _token_id, dpo_loss, sequence_logps, sequences  # noqa: E402

from dera_local.sources.default_pair import demo_reference_path  # noqa: E402


def make_full(model: TorchLlama) -> list[torch.nn.Parameter]:
    """Turns every weight into a trained parameter (adapters off); the output layer stays
    tied to the token embedding, as in SmolLM2."""
    model.lora_enabled(False)
    embedding, output_norm = model.token_embd.clone(), model.output_norm.clone()
    del model.token_embd, model.output, model.output_norm  # buffers become parameters
    model.token_embd = torch.nn.Parameter(embedding)
    model.output = model.token_embd
    model.output_norm = torch.nn.Parameter(output_norm)
    params = [model.token_embd, model.output_norm]
    for block in model.blocks:
        for norm in ("attn_norm", "ffn_norm"):
            # A copy: the loaded values may be the GGUF's read-only memory map, and the
            # optimizer writes in place.
            weight = torch.nn.Parameter(getattr(block, norm).detach().clone())
            setattr(block, norm, weight)
            params.append(weight)
        for name in PROJECTIONS:
            layer = getattr(block, name)
            weight = torch.nn.Parameter(layer.weight.clone())
            del layer.weight
            layer.weight = weight
            params.append(weight)
    return params


def weights(model: TorchLlama) -> dict[str, np.ndarray]:
    """llama.cpp tensor names -> float32 arrays in llama.cpp's layout."""
    out = {
        "token_embd.weight": model.token_embd.detach().numpy(),
        "output_norm.weight": model.output_norm.detach().numpy(),
    }
    for i, block in enumerate(model.blocks):
        out[f"blk.{i}.attn_norm.weight"] = block.attn_norm.detach().numpy()
        out[f"blk.{i}.ffn_norm.weight"] = block.ffn_norm.detach().numpy()
        for name in PROJECTIONS:
            out[f"blk.{i}.{name}.weight"] = getattr(block, name).weight.detach().numpy()
    return out


def write_like(base: Path, tensors: dict[str, np.ndarray], path: Path, name: str) -> None:
    """A GGUF with the base's metadata and `tensors` (F16 matrices, F32 vectors)."""
    reader = gguf.GGUFReader(str(base))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(path), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        value = field.contents()
        if key == "general.name":
            value = name
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for tensor_name, values in tensors.items():
        kind = np.float16 if values.ndim == 2 else np.float32
        writer.add_tensor(tensor_name, np.ascontiguousarray(values, dtype=kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-pairs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=HERE / "data")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    pairs = [json.loads(line) for line in (args.data / "pairs.jsonl").open()]
    base = demo_reference_path()
    model = TorchLlama(base, rank=1, alpha=1.0)
    eot = _token_id(base, END_OF_TURN)
    reference_tensors = weights(model)
    write_like(base, reference_tensors, args.out_dir / "reference.f16.gguf",
               "SmolLM2-135M-Instruct (F16 of the Q4_1 base)")  # fmt: skip
    params = make_full(model)
    with torch.no_grad():
        reference_logps = [sequence_logps(model, sequences(p, eot)) for p in pairs]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order = [i for _ in range(args.epochs) for i in random.sample(range(len(pairs)), len(pairs))]
    batches = [order[i : i + args.batch_pairs] for i in range(0, len(order), args.batch_pairs)]
    started = time.time()
    for step, batch in enumerate(batches, start=1):
        loss, margin = dpo_loss(model, pairs, batch, reference_logps, eot, args.beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        accuracy = (margin > 0).float().mean().item()
        print(f"step {step}/{len(batches)} loss {loss.item():.4f} acc {accuracy:.2f} "
              f"{time.time() - started:.0f}s", file=sys.stderr, flush=True)  # fmt: skip
    out = args.out_dir / "aligned-full.f16.gguf"
    write_like(base, weights(model), out, "SmolLM2-135M-Instruct conciseness DPO, full weights")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} sha256 {digest} ({time.time() - started:.0f}s of training)",
          file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
