"""Bad model files and mismatched pairs give one clear line naming the file, never a crash."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from tiny_models import write_tiny_model

import dera_local
from dera_local.errors import IncompatibleModelsError, ModelFileError


def test_missing_file(tmp_path, reference_path):
    with pytest.raises(ModelFileError, match="no such file") as info:
        dera_local.load_pair(tmp_path / "nope.gguf", reference_path)
    assert "nope.gguf" in str(info.value)


def test_not_gguf(tmp_path, reference_path):
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        dera_local.load_pair(bogus, reference_path)


def test_directory_instead_of_file(tmp_path, reference_path):
    with pytest.raises(ModelFileError, match="not a file"):
        dera_local.load_pair(tmp_path, reference_path)


def test_truncated_file(tmp_path, aligned_path, reference_path):
    data = aligned_path.read_bytes()
    for keep in (len(data) // 2, len(data) - 100, 40):
        cut = tmp_path / f"cut-{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(ModelFileError, match="truncated|corrupt") as info:
            dera_local.load_pair(aligned_path, cut)
        assert str(cut) in str(info.value)


def test_corrupt_header(tmp_path, aligned_path, reference_path):
    data = bytearray(aligned_path.read_bytes())
    data[8:24] = b"\xff" * 16  # tensor and metadata counts become absurd
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt"):
        dera_local.load_pair(aligned_path, bad)


def test_architecture_llama_cpp_lacks(tmp_path, reference_path):
    path = write_tiny_model(tmp_path / "alien.gguf", seed=1, architecture="alienformer")
    with pytest.raises(ModelFileError, match="alienformer") as info:
        dera_local.load_pair(reference_path, path)
    assert str(path) in str(info.value)


def test_model_without_tokenizer(tmp_path, reference_path):
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError, match="no tokenizer"):
        dera_local.load_pair(path, reference_path)


def test_adapter_passed_as_model(tmp_path, reference_path):
    path = tmp_path / "adapter.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError, match="this GGUF is an adapter, not a model") as info:
        dera_local.load_pair(path, reference_path)
    assert info.value.cli_hint == "pass it with --lora"


def test_different_token_text_names_id_and_both_texts(aligned_path, other_vocab_path):
    with pytest.raises(IncompatibleModelsError) as info:
        dera_local.load_pair(aligned_path, other_vocab_path)
    message = str(info.value)
    assert "token 257" in message and "'he'" in message and "'hx'" in message


def test_different_vocabulary_size(tmp_path, aligned_path):
    from tiny_models import tokenizer_vocab

    tokens = tokenizer_vocab()[0] + ["<extra>"]
    bigger = write_tiny_model(tmp_path / "bigger.gguf", seed=4, tokens=tokens)
    with pytest.raises(IncompatibleModelsError, match="263 vs 264"):
        dera_local.load_pair(aligned_path, bigger)


def test_read_gguf_reports_metadata(aligned_path):
    info = dera_local.read_gguf(aligned_path)
    assert info.architecture == "llama"
    assert info.n_vocab == 263
    assert info.special_ids["eos"] == info.tokens.index("<|im_end|>")
    assert info.chat_template and "im_start" in info.chat_template


def _patched_copy(source, target, patch) -> None:
    """A copy of a GGUF file with one header value changed in place (same size)."""
    target.write_bytes(source.read_bytes())
    reader = gguf.GGUFReader(str(target), "r+")
    patch(reader)
    reader.data.flush()
    del reader


def test_a_tensor_offset_near_two_to_the_64_is_caught(tmp_path, aligned_path, reference_path):
    path = tmp_path / "offset.gguf"

    def far_offset(reader) -> None:
        reader.tensors[0].field.parts[-1][0] = 2**64 - 1

    _patched_copy(aligned_path, path, far_offset)
    with pytest.raises(ModelFileError, match="has offset 18446744073709551615, past the end"):
        dera_local.read_gguf(path)
    with pytest.raises(ModelFileError, match="past the end"):
        dera_local.load_pair(path, reference_path)
    from click.testing import CliRunner

    from dera_local.cli import cli

    result = CliRunner().invoke(cli, ["info", "-m", str(path), "-mr", str(reference_path)])
    assert result.exit_code == 1 and result.stderr.strip().count("\n") == 0
    assert "past the end" in result.stderr


def test_a_non_utf8_metadata_string_is_one_line_naming_the_key(tmp_path, run, lora_path):
    from click.testing import CliRunner

    from dera_local.cli import cli

    path = tmp_path / "name.gguf"

    def break_name(reader) -> None:
        field = reader.fields["general.architecture"]
        field.parts[field.data[0]][0] = 0xFF

    _patched_copy(lora_path, path, break_name)
    with pytest.raises(ModelFileError, match="general.architecture is not valid UTF-8"):
        dera_local.read_gguf(path, expect="adapter")
    result = CliRunner().invoke(cli, ["info", "--lora", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().count("\n") == 0 and "not valid UTF-8" in result.stderr


def _set_scalar(key):
    def patch(value):
        def apply(reader) -> None:
            field = reader.fields[key]
            field.parts[field.data[0]][0] = value

        return apply

    return patch


@pytest.mark.parametrize(
    "patch, message",
    [
        (_set_scalar("llama.attention.layer_norm_rms_epsilon")(float("nan")), "must be a positive"),
        (_set_scalar("llama.attention.layer_norm_rms_epsilon")(-1e-5), "must be a positive"),
        (_set_scalar("llama.block_count")(0), "block_count is 0; llama.cpp loads 1 to 512"),
        (_set_scalar("llama.block_count")(65536), "block_count is 65536; llama.cpp loads 1"),
    ],
)
def test_values_that_abort_llama_cpp_are_caught_first(tmp_path, reference_path, patch, message):
    path = tmp_path / "bad.gguf"
    _patched_copy(reference_path, path, patch)
    with pytest.raises(ModelFileError, match=message):
        dera_local.load_pair(path, reference_path)


def test_duplicate_token_texts_and_non_f32_norms_are_caught(tmp_path, reference_path):
    from tiny_models import tokenizer_vocab as tiny_vocab

    tokens = list(tiny_vocab()[0])
    tokens[300 % len(tokens)] = tokens[5]
    duplicated = write_tiny_model(tmp_path / "dup.gguf", seed=3, tokens=tokens)
    with pytest.raises(ModelFileError, match="repeats the text of token 5"):
        dera_local.read_gguf(duplicated)

    path = tmp_path / "norm.gguf"

    def norm_as_f16(reader) -> None:
        tensor = next(t for t in reader.tensors if t.name.endswith("_norm.weight"))
        tensor.field.parts[-2][0] = int(gguf.GGMLQuantizationType.F16)

    _patched_copy(reference_path, path, norm_as_f16)
    with pytest.raises(ModelFileError, match="llama.cpp needs norm weights in F32"):
        dera_local.read_gguf(path)


def _integer_weights(reader) -> None:
    reader.tensors[3].field.parts[-2][0] = int(gguf.GGMLQuantizationType.I32)


def _unaligned_tensor(reader) -> None:
    reader.tensors[3].field.parts[-1][0] += 8


# Found by scripts/fuzz_gguf.py: each crashed llama.cpp (SIGSEGV in the first decode,
# SIGABRT when mapping the file) before the pre-check existed.
@pytest.mark.parametrize(
    "patch, message",
    [
        (_integer_weights, "stored as I32, which llama.cpp cannot compute with"),
        (_unaligned_tensor, "not a multiple of 32; llama.cpp cannot map it"),
    ],
)
def test_tensors_that_crash_llama_cpp_are_caught_first(tmp_path, reference_path, patch, message):
    path = tmp_path / "bad.gguf"
    _patched_copy(reference_path, path, patch)
    with pytest.raises(ModelFileError, match=message):
        dera_local.load_pair(path, reference_path)


def test_error_messages_quoting_damaged_text_stay_one_line():
    from dera_local.errors import DeraError

    error = DeraError("tensor 'blk.1.a\ntn_v' in\r a\u2028file\x00")
    assert str(error) == "tensor 'blk.1.a\\ntn_v' in\\r a\\u2028file\\x00"
    assert len(str(error).splitlines()) == 1
    assert str(DeraError("plain: ünïcode stays")) == "plain: ünïcode stays"


def test_a_value_of_the_wrong_type_is_one_line_not_an_abort(tmp_path, reference_path, lora_path):
    """llama.cpp reads adapter.lora.alpha with a typed getter that aborts on INT32
    (found by the fuzzer: one flipped type byte)."""
    path = tmp_path / "alpha.gguf"

    def alpha_as_int(reader) -> None:
        field = reader.fields["adapter.lora.alpha"]
        field.parts[field.data[0] - 1][0] = int(gguf.GGUFValueType.INT32)

    _patched_copy(lora_path, path, alpha_as_int)
    with pytest.raises(ModelFileError, match="adapter.lora.alpha is INT32, not FLOAT32"):
        dera_local.load_pair(None, reference_path, lora=path)
