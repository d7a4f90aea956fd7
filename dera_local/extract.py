"""Extracting an aligned model as a low-rank (LoRA) adapter on its reference, so that a
DeRa pair fits in the memory of one model plus a small adapter.

For every weight matrix both models have, the difference W_aligned - W_reference (each
dequantized from its GGUF type by the `gguf` package) is truncated to rank R by SVD and
written as llama.cpp's LoRA tensors (lora_b @ lora_a = the truncated difference; alpha 0,
so llama.cpp scales it by 1). Differences an adapter cannot carry (norm vectors, a tied
embedding) are reported with their size, never dropped silently.

SVD: scipy's LAPACK `gesdd` for matrices up to 2048 on their short side (exact, fast at
that size), scikit-learn's `randomized_svd` (Halko et al., seeded, with power iterations)
above, where a full SVD of a 4096 x 14336 matrix would cost minutes per tensor. Both are
well-kept, widely used implementations; neither is rewritten here.

One tensor at a time: the models are memory-mapped, so peak memory is a few tensors plus
the adapter. The output is written to a temporary file and renamed at the end: an
interrupted run leaves no partial adapter.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadParameterError, DeraError, IncompatibleModelsError
from .llama.gguf_inspect import check_same_tokenizer, read_gguf
from .sources.hub import file_sha256

FULL_SVD_LIMIT = 2048  # short side up to which a full (exact) SVD is used
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass
class TensorDifference:
    """One tensor's difference and what the adapter keeps of it."""

    name: str
    shape: tuple[int, ...]
    norm: float  # Frobenius norm of W_aligned - W_reference
    kept_norm: float = 0.0  # of the rank-R approximation (0 when not carried)
    carried: bool = True
    why_not: str | None = None  # when not carried

    @property
    def kept_share(self) -> float:
        """Share of the difference's energy (squared Frobenius norm) the adapter keeps."""
        return 1.0 if self.norm == 0 else (self.kept_norm / self.norm) ** 2


@dataclass
class ExtractReport:
    output: str
    rank: int
    tensors: list[TensorDifference] = field(default_factory=list)
    seconds: float = 0.0
    adapter_bytes: int = 0

    def _share(self, items: list[TensorDifference]) -> float:
        total = sum(t.norm**2 for t in items)
        kept = sum(t.kept_norm**2 for t in items)
        return 1.0 if total == 0 else kept / total

    @property
    def kept_share(self) -> float:
        """Overall share of the difference's energy the adapter keeps (all tensors)."""
        return self._share(self.tensors)

    def per_layer(self) -> dict[str, float]:
        """Share kept per block (blk.N) and for the rest ("other": embeddings, output),
        for the groups that differ at all."""
        groups: dict[str, list[TensorDifference]] = {}
        for tensor in self.tensors:
            if tensor.norm > 0:
                match = _LAYER.match(tensor.name)
                groups.setdefault(f"blk.{match[1]}" if match else "other", []).append(tensor)
        return {name: self._share(items) for name, items in groups.items()}

    @property
    def not_carried(self) -> list[TensorDifference]:
        return [t for t in self.tensors if not t.carried and t.norm > 0]

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "rank": self.rank,
            "kept_share": self.kept_share,
            "per_layer": self.per_layer(),
            "not_carried": [asdict(t) for t in self.not_carried],
            "tensors": [asdict(t) for t in self.tensors],
            "seconds": self.seconds,
            "adapter_bytes": self.adapter_bytes,
        }


def truncated_svd(matrix: np.ndarray, rank: int, seed: int = 0):
    """(U_r * S_r, V_r^T) of `matrix` (float32/64), the best rank-r approximation."""
    from scipy import linalg

    rank = min(rank, *matrix.shape)
    matrix = matrix.astype(np.float64)  # one matrix at a time: precision is cheap here
    if min(matrix.shape) <= FULL_SVD_LIMIT:
        u, s, vt = linalg.svd(matrix, full_matrices=False, lapack_driver="gesdd")
    else:
        from sklearn.utils.extmath import randomized_svd

        u, s, vt = randomized_svd(matrix, rank, n_oversamples=16, n_iter=6, random_state=seed)
    return u[:, :rank] * s[:rank], vt[:rank]


def _dequantized(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def extract(
    aligned: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int = 16,
    dtype: str = "f16",
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> ExtractReport:
    """Writes `output`, a LoRA GGUF that turns `reference` into (approximately) `aligned`
    (load the pair with load_pair(None, reference, lora=output)); returns what it kept.
    `progress(name)` is called after each tensor; an existing `output` is replaced only
    with `overwrite`. Raises DeraError with one line; nothing is written when the models
    share every matrix (no adapter could carry what differs)."""
    try:
        import gguf
        import scipy  # noqa: F401
    except ImportError:
        raise DeraError("extract needs scipy: pip install 'dera-local[extract]'") from None
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 4096:
        raise BadParameterError(f"the rank must be an integer from 1 to 4096, got {rank!r}")
    if dtype not in ("f16", "f32"):
        raise BadParameterError(f"the adapter type must be f16 or f32, got {dtype!r}")
    aligned_info, reference_info = read_gguf(aligned), read_gguf(reference)
    if aligned_info.architecture != reference_info.architecture:
        raise IncompatibleModelsError(
            f"{aligned_info.path.name} is {aligned_info.architecture!r} but "
            f"{reference_info.path.name} is {reference_info.architecture!r}"
        )
    check_same_tokenizer(aligned_info, reference_info)
    output = Path(output).expanduser()
    if output.exists() and output.is_dir():
        raise BadParameterError(f"{output} is a folder; give the adapter's file name")
    if output.exists() and not overwrite:
        raise BadParameterError(
            f"{output} exists; give another name", cli_hint="or --force to replace it"
        )
    temporary = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        temporary.touch()
    except OSError as exc:
        raise BadParameterError(f"cannot write {output}: {exc.strerror}") from None

    started = time.perf_counter()
    report = ExtractReport(str(output), rank)
    try:
        a_reader = gguf.GGUFReader(str(aligned_info.path))
        r_reader = gguf.GGUFReader(str(reference_info.path))
        a_tensors = {t.name: t for t in a_reader.tensors}
        r_tensors = {t.name: t for t in r_reader.tensors}
        _check_same_tensors(a_tensors, r_tensors, aligned_info.path, reference_info.path)
        tied = "output.weight" not in r_tensors
        writer = gguf.GGUFWriter(str(temporary), reference_info.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # scale 1 at any rank
        writer.add_name(f"{aligned_info.path.name} - {reference_info.path.name}, rank {rank}")
        kind = np.float16 if dtype == "f16" else np.float32
        for name, r_tensor in r_tensors.items():
            difference = np.array(_dequantized(a_tensors[name]))  # writable, not the map
            difference -= _dequantized(r_tensor)  # in place: one matrix less at the peak
            entry = TensorDifference(
                name, tuple(int(n) for n in difference.shape), float(np.linalg.norm(difference))
            )
            report.tensors.append(entry)
            why_not = _no_lora_form(name, difference, tied)
            if entry.norm == 0.0:
                entry.carried = False
            elif why_not is not None:
                entry.carried, entry.why_not = False, why_not
            else:
                left, right = truncated_svd(difference, rank)
                entry.kept_norm = float(np.linalg.norm(left @ right))
                if name == "token_embd.weight":  # llama.cpp's flipped form for embeddings
                    tensors = {"lora_a": left, "lora_b": right.T}
                else:
                    tensors = {"lora_a": right, "lora_b": left}
                for suffix, values in tensors.items():
                    writer.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(values, kind))
            if progress is not None:
                progress(name)
        report.seconds = time.perf_counter() - started
        if not any(entry.carried for entry in report.tensors):
            raise BadParameterError(_nothing_to_carry(report))
        for key, value in (
            ("dera.extract.aligned", aligned_info.path.name),
            ("dera.extract.aligned.sha256", file_sha256(aligned_info.path)),
            ("dera.extract.reference", reference_info.path.name),
            ("dera.extract.reference.sha256", file_sha256(reference_info.path)),
        ):
            writer.add_string(key, value)
        writer.add_uint32("dera.extract.rank", rank)
        writer.add_float32("dera.extract.kept_share", report.kept_share)
        writer.add_uint32("dera.extract.not_carried", len(report.not_carried))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)  # nothing half-written is left (Ctrl-C too)
        raise
    report.adapter_bytes = output.stat().st_size
    return report


def _nothing_to_carry(report: ExtractReport) -> str:
    differing = [entry for entry in report.tensors if entry.norm > 0.0]
    if not differing:
        return "the two models have the same weights: there is no difference to extract"
    names = ", ".join(entry.name for entry in differing[:3])
    more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
    return (
        f"no matrix differs between the two models, only {names}{more}, which a LoRA "
        f"adapter cannot carry ({differing[0].why_not}): no adapter written"
    )


def _check_same_tensors(aligned: dict, reference: dict, a_path: Path, r_path: Path) -> None:
    for name in sorted(set(aligned) ^ set(reference)):
        where = a_path.name if name in aligned else r_path.name
        raise IncompatibleModelsError(f"tensor {name} is only in {where}: not one architecture")
    for name, tensor in reference.items():
        other = aligned[name]
        if tuple(other.shape) != tuple(tensor.shape):
            raise IncompatibleModelsError(
                f"tensor {name} is {tuple(int(n) for n in other.shape)} in {a_path.name} "
                f"but {tuple(int(n) for n in tensor.shape)} in {r_path.name}"
            )


def _no_lora_form(name: str, difference: np.ndarray, tied: bool) -> str | None:
    """Why llama.cpp could not apply an adapter to this tensor (None: it can)."""
    if difference.ndim != 2:
        return "a vector (norm weights, biases): llama.cpp's LoRA adapts matrices only"
    if name == "token_embd.weight" and tied:
        return (
            "the token embedding is tied to the output layer here, and llama.cpp applies an "
            "embedding adapter in a form the output layer cannot take"
        )
    if not name.endswith(".weight"):
        return "not a weight matrix"
    return None


def describe(report: ExtractReport) -> list[str]:
    """The lines `dera-local extract` prints."""
    carried = [t for t in report.tensors if t.carried]
    lines = [
        f"wrote {report.output}: rank {report.rank}, {len(carried)} matrices, "
        f"{report.adapter_bytes / 2**20:.1f} MiB, {report.seconds:.1f} s",
        f"kept {100 * report.kept_share:.1f}% of the difference's energy (squared Frobenius "
        "norm) overall",
    ]
    layers = report.per_layer()
    worst = sorted(layers.items(), key=lambda kv: kv[1])[:3]
    lines.append(
        "per layer: "
        + ", ".join(f"{name} {100 * share:.1f}%" for name, share in worst)
        + (" (the three lowest; --json has all)" if len(layers) > 3 else "")
    )
    for tensor in report.not_carried:
        lines.append(
            f"not carried: {tensor.name} {tensor.shape}, difference norm {tensor.norm:.4g}: "
            f"{tensor.why_not}"
        )
    return lines


__all__ = ["ExtractReport", "TensorDifference", "describe", "extract", "truncated_svd"]
