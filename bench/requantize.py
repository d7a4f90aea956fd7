"""Writes a copy of a GGUF model with its Q4_1 tensors re-quantized to another type
(through float32, with the gguf package's numpy quantizers), to see whether a result
depends on the quantization type. Not a quality-preserving quantizer: for benchmarks.

    python bench/requantize.py SRC.gguf DST.gguf Q4_0
"""

from __future__ import annotations

import argparse

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize


def requantize(source: str, target: str, kind: GGMLQuantizationType) -> None:
    reader = GGUFReader(source)
    writer = GGUFWriter(target, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.tensor_type == GGMLQuantizationType.Q4_1:
            weights = dequantize(tensor.data, GGMLQuantizationType.Q4_1).astype(np.float32)
            writer.add_tensor(tensor.name, quantize(weights, kind), raw_dtype=kind)
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("type", choices=["Q4_0", "Q5_0", "Q8_0"])
    args = parser.parse_args()
    requantize(args.source, args.target, GGMLQuantizationType[args.type])


if __name__ == "__main__":
    main()
