"""Runs one generation case (JSON on argv[1]) with whatever llama-cpp-python this Python
has, and prints the result as JSON: what the device suite compares between the GPU build
(in its own virtual environment) and the CPU build (DERA_CPU_PYTHON). A separate process
per case, so every run starts from a fresh llama.cpp, as users run it.

Case keys: aligned / reference / lora / draft_model (paths; builtin: true for the
built-in pair, as each build's environment installed it), rpc (workers), n_gpu_layers,
n_gpu_layers_reference, overlap
(null: the default), lam or lams (a sweep), prompt (text, chat template off), max_tokens,
temperature, seed, draft_max (0: no speculation), top_n (logprobs), chat (true: the
prompt is one user message in the model's chat template), prompt_tokens (token ids
instead of a prompt); the output has the prompt's tokens too.
"""

from __future__ import annotations

import json
import sys


def run(case: dict) -> dict:
    import dera_local
    from dera_local.analysis.sweep import LambdaSweep
    from dera_local.llama import backend
    from dera_local.speculation.drafts import SpeculationParams

    # Fixed draft lengths: the adaptive rule decides from measured step times, which
    # differ between the builds, and the comparison needs the same verification batches.
    drafts = case.get("draft_max", 0)
    speculation = SpeculationParams(draft_max=drafts, draft_min=min(1, drafts), adaptive=False)
    if case.get("builtin"):
        from dera_local.sources.default_pair import demo_adapter_path, demo_reference_path

        case = {**case, "reference": str(demo_reference_path()), "lora": str(demo_adapter_path())}
    pair = dera_local.load_pair(
        case.get("aligned"),
        case["reference"],
        lora=case.get("lora"),
        n_ctx=case.get("n_ctx", 512),
        n_threads=2,
        n_gpu_layers=case.get("n_gpu_layers"),
        n_gpu_layers_reference=case.get("n_gpu_layers_reference"),
        overlap_decodes=case.get("overlap"),
        draft_model=case.get("draft_model"),
        speculation=speculation,
        rpc=case.get("rpc"),
    )
    with pair:
        if "prompt_tokens" in case:
            prompt = list(case["prompt_tokens"])
        elif case.get("chat"):
            session = dera_local.ChatSession(pair)
            session.messages = [{"role": "user", "content": case["prompt"]}]
            prompt = session.prompt_tokens()
        else:
            prompt = pair.tokenize(case["prompt"])
        sampling = dera_local.SamplingParams(
            temperature=case.get("temperature", 0.0),
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            seed=case.get("seed", 1),
        )
        out = {
            "prompt_tokens": prompt,
            "gpu_offload": backend.supports_gpu_offload(),
            # each RPC device's total memory, as the worker reports it
            "worker_memory_mib": [
                pair.loaded.aligned_model.calls(d.memory)[1] // 2**20
                for d in pair.loaded.aligned_model.worker_devices
            ],
            "overlap": pair.overlap_decodes,
            "one_copy": pair.loaded.aligned_model is pair.loaded.reference_model,
            "layers": {
                role: model.layers.describe()
                for role, model in (
                    ("aligned", pair.loaded.aligned_model),
                    ("reference", pair.loaded.reference_model),
                )
            },  # fmt: skip
        }
        if "lams" in case:
            with LambdaSweep(pair, case["lams"], max_tokens=case["max_tokens"]) as sweep:
                rows = sweep.run(prompt, sampling=sampling)
            out["rows"] = [{"lam": r.lam, "tokens": r.tokens} for r in rows]
            return out
        result = pair.generate(
            prompt,
            lam=case["lam"],
            sampling=sampling,
            max_tokens=case["max_tokens"],
            logprobs=True,
            top_logprobs=case.get("top_n", 2),
        )
        data = result.to_dict()
        out.update(
            tokens=result.tokens,
            text=result.text,
            dera=data["dera"],
            drafted=result.drafted,
            accepted=result.accepted,
            # each token's log-probability under each model and the mixture
            steps={
                "aligned": result.logprobs.aligned,
                "reference": result.logprobs.reference,
                "mixture": result.logprobs.mixture,
            },
            # the mixture's two best tokens at each step: the gap at a near-tie
            top=[[list(entry) for entry in step] for step in result.logprobs.top],
        )
        return out


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
