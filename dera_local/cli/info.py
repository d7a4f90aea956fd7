"""`dera-local info`: what each model is, whether they can pair, and how dera-local will
run them (mixing path, llama.cpp build features)."""

from __future__ import annotations

import click

from .. import backend
from ..errors import DeraError
from ..gguf_inspect import GGUFInfo, check_same_tokenizer, read_gguf
from ..mixing import LogitMixer


def _describe(role: str, info: GGUFInfo) -> list[str]:
    return [
        f"{role}: {info.path}",
        f"  name: {info.name}",
        f"  architecture: {info.architecture}",
        f"  quantization: {info.quantization}",
        f"  file size: {info.file_size / 2**20:.1f} MiB, {info.n_tensors} tensors",
        f"  vocabulary: {info.n_vocab} tokens, special ids {info.special_ids}",
        f"  training context: {info.context_length}",
        f"  chat template: {'yes' if info.chat_template else 'none (ChatML is used)'}",
    ]


@click.command()
@click.option("-m", "--aligned", envvar="DERA_ALIGNED", metavar="GGUF", help="Aligned model.")
@click.option(
    "-mr", "--reference", envvar="DERA_REFERENCE", metavar="GGUF", help="Reference model."
)
@click.option("--hook", type=click.Choice(["native", "numpy"]), default=None, envvar="DERA_HOOK")
def info(aligned: str | None, reference: str | None, hook: str | None) -> None:
    """Show both models, the compatibility verdict, the mixing path and llama.cpp's build."""
    import llama_cpp

    mixer = LogitMixer(hook)
    lines = [
        f"mixing hook: {mixer.describe()}",
        f"llama-cpp-python: {llama_cpp.__version__}",
        f"llama.cpp build: {backend.system_info()}",
        f"GPU offload: {'yes' if backend.supports_gpu_offload() else 'no (CPU build)'}",
    ]
    if backend.built_with_amx():
        lines.append(
            "AMX: built in; weights load without extra buffer types "
            "(use_extra_bufts=False) to avoid the AMX crash"
        )
    else:
        lines.append("AMX: not built in; weights use llama.cpp's extra (repacked) buffer types")
    verdict_error: DeraError | None = None
    infos = {}
    for role, path in (("aligned", aligned), ("reference", reference)):
        if path:
            infos[role] = read_gguf(path)
            lines += _describe(role, infos[role])
    if len(infos) == 2:
        try:
            check_same_tokenizer(infos["aligned"], infos["reference"])
        except DeraError as exc:
            verdict_error = exc
            lines.append("compatibility: INCOMPATIBLE")
        else:
            lines.append("compatibility: OK, one tokenizer (ids, texts, types, BOS/EOS/EOT)")
    click.echo("\n".join(lines))
    if verdict_error is not None:
        raise verdict_error
