"""A seeded mutator of valid GGUF files, for fuzzing dera-local's loader.

`parse` walks a GGUF file's layout (header, key/value pairs, tensor infos, data) and
records where every length, count, type, dimension and offset sits. `mutate` then damages
one or two of them in the ways loaders have historically mishandled: flipped bytes,
truncation at structural boundaries, huge lengths and counts, huge or zero dimensions,
offsets past the end or overlapping, unknown types, odd alignment, duplicated keys and
tensor names. The same (seed file, case number) always gives the same bytes.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

# GGUF value types (gguf spec): fixed sizes of the scalar ones; 8 = string, 9 = array.
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
SCALAR_FORMATS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32

U64_EDGES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**48, 2**63 - 1, 2**63, 2**64 - 1]
U32_EDGES = [0, 1, 2, 5, 13, 40, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]


@dataclass
class Slot:
    """An integer field in the file: its byte offset, width (4 or 8) and role."""

    offset: int
    width: int
    kind: str  # n_tensors, n_kv, version, str_len, kv_type, arr_type, arr_count, n_dims,
    # dim, tensor_type, tensor_offset, value


@dataclass
class KV:
    key: str
    raw: bytes  # the whole entry: key, type and value
    value_type: int
    value_offset: int  # where the value starts, relative to the entry


@dataclass
class TensorInfo:
    name: bytes
    dims: list[int]
    ggml_type: int
    offset: int


@dataclass
class Layout:
    version: int
    kvs: list[KV]
    tensors: list[TensorInfo]
    data: bytes  # everything from the (aligned) start of tensor data
    slots: list[Slot] = field(default_factory=list)
    boundaries: list[int] = field(default_factory=list)  # ends of structural units
    data_start: int = 0
    alignment: int = DEFAULT_ALIGNMENT


class _Cursor:
    def __init__(self, blob: bytes):
        self.blob, self.pos = blob, 0

    def take(self, fmt: str) -> int | float:
        size = struct.calcsize("<" + fmt)
        (value,) = struct.unpack_from("<" + fmt, self.blob, self.pos)
        self.pos += size
        return value

    def string(self) -> bytes:
        length = self.take("Q")
        self.skip(length)
        return self.blob[self.pos - length : self.pos]

    def skip(self, size: int) -> None:
        # Damaged files (a mutation stacked on a mutation) declare lengths and counts
        # past the end: stop there instead of walking 2**63 items.
        if self.pos + size > len(self.blob):
            raise ValueError(f"runs past the end at {self.pos}")
        self.pos += size


def parse(blob: bytes) -> Layout:
    """The layout of a valid GGUF v3 file (the seeds are written by the gguf package)."""
    cur = _Cursor(blob)
    slots: list[Slot] = []
    boundaries: list[int] = []
    assert blob[:4] == b"GGUF"
    cur.pos = 4
    version = cur.take("I")
    slots += [Slot(4, 4, "version"), Slot(8, 8, "n_tensors"), Slot(16, 8, "n_kv")]
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    boundaries += [4, 8, 16, 24]
    kvs = []
    for _ in range(n_kv):
        start = cur.pos
        slots.append(Slot(cur.pos, 8, "str_len"))
        key = cur.string().decode()
        boundaries.append(cur.pos)
        slots.append(Slot(cur.pos, 4, "kv_type"))
        value_type = cur.take("I")
        value_offset = cur.pos - start
        _skip_value(cur, value_type, slots, boundaries)
        boundaries.append(cur.pos)
        kvs.append(KV(key, blob[start : cur.pos], value_type, value_offset))
    tensors = []
    for _ in range(n_tensors):
        slots.append(Slot(cur.pos, 8, "str_len"))
        name = cur.string()
        slots.append(Slot(cur.pos, 4, "n_dims"))
        n_dims = cur.take("I")
        dims = []
        for _ in range(n_dims):
            slots.append(Slot(cur.pos, 8, "dim"))
            dims.append(cur.take("Q"))
        slots.append(Slot(cur.pos, 4, "tensor_type"))
        ggml_type = cur.take("I")
        slots.append(Slot(cur.pos, 8, "tensor_offset"))
        offset = cur.take("Q")
        boundaries.append(cur.pos)
        tensors.append(TensorInfo(name, dims, ggml_type, offset))
    alignment = DEFAULT_ALIGNMENT
    for kv in kvs:
        if kv.key == "general.alignment":
            alignment = struct.unpack_from("<I", kv.raw, kv.value_offset)[0]
    data_start = _align(cur.pos, alignment)
    boundaries.append(data_start)
    for tensor in tensors:
        boundaries.append(data_start + tensor.offset)
    boundaries.append(len(blob))
    return Layout(
        version,
        kvs,
        tensors,
        blob[data_start:],
        slots,
        sorted(set(boundaries)),
        data_start,
        alignment,
    )


def _skip_value(cur: _Cursor, value_type: int, slots: list[Slot], boundaries: list[int]) -> None:
    if value_type == STRING:
        slots.append(Slot(cur.pos, 8, "str_len"))
        cur.string()
    elif value_type == ARRAY:
        slots.append(Slot(cur.pos, 4, "arr_type"))
        item_type = cur.take("I")
        slots.append(Slot(cur.pos, 8, "arr_count"))
        count = cur.take("Q")
        for i in range(count):
            # Long arrays (the vocabulary): record only the first items' slots.
            if i < 4:
                _skip_value(cur, item_type, slots, boundaries)
            else:
                _skip_value(cur, item_type, [], [])
    else:
        size = SCALAR_SIZES[value_type]
        if size >= 4:
            slots.append(Slot(cur.pos, size, "value"))
        cur.skip(size)


def _align(position: int, alignment: int) -> int:
    return position + (-position % alignment) if alignment > 0 else position


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def build(layout: Layout, *, alignment: int | None = None) -> bytes:
    """Serializes a (possibly edited) layout: header, key/values, tensor infos, padding to
    the alignment the file declares (or `alignment`), then the original tensor data."""
    head = b"GGUF" + struct.pack("<IQQ", layout.version, len(layout.tensors), len(layout.kvs))
    body = b"".join(kv.raw for kv in layout.kvs)
    for t in layout.tensors:
        body += _string(t.name) + struct.pack("<I", len(t.dims))
        body += b"".join(struct.pack("<Q", d) for d in t.dims)
        body += struct.pack("<IQ", t.ggml_type, t.offset)
    blob = head + body
    pad_to = alignment if alignment is not None else layout.alignment
    padded = _align(len(blob), pad_to if 0 < pad_to < 2**20 else DEFAULT_ALIGNMENT)
    return blob + b"\0" * (padded - len(blob)) + layout.data


def kv_u32(key: str, value: int) -> KV:
    raw = _string(key.encode()) + struct.pack("<II", 4, value)
    return KV(key, raw, 4, len(raw) - 4)


# --- mutations: each takes (rng, blob, layout) and returns new bytes and a description ---


def flip_bytes(rng: random.Random, blob: bytes, layout: Layout) -> tuple[bytes, str]:
    out = bytearray(blob)
    where = []
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(layout.data_start)
        out[i] ^= rng.randrange(1, 256)
        where.append(i)
    return bytes(out), f"flip bytes at {where}"


def truncate(rng: random.Random, blob: bytes, layout: Layout) -> tuple[bytes, str]:
    if rng.random() < 0.8:
        cut = rng.choice(layout.boundaries) + rng.choice([-1, 0, 0, 1])
    else:
        cut = rng.randrange(len(blob))
    cut = max(0, min(cut, len(blob) - 1))
    return blob[:cut], f"truncate at {cut}"


def set_slot(
    rng: random.Random, blob: bytes, layout: Layout, kinds: tuple[str, ...]
) -> tuple[bytes, str]:
    candidates = [s for s in layout.slots if s.kind in kinds]
    slot = rng.choice(candidates)
    if slot.kind == "tensor_offset":
        value = _tensor_offset(rng, blob, layout)
    elif slot.kind == "value" and rng.random() < 0.4:
        return _set_float(rng, blob, slot)
    else:
        edges = U64_EDGES if slot.width == 8 else U32_EDGES
        value = rng.choice(edges + [rng.randrange(2 ** (8 * slot.width))])
        value %= 2 ** (8 * slot.width)
    fmt = "<Q" if slot.width == 8 else "<I"
    out = bytearray(blob)
    struct.pack_into(fmt, out, slot.offset, value)
    return bytes(out), f"{slot.kind} at {slot.offset} := {value}"


def _set_float(rng: random.Random, blob: bytes, slot: Slot) -> tuple[bytes, str]:
    value = rng.choice([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e30, -1e-30])
    out = bytearray(blob)
    struct.pack_into("<f" if slot.width == 4 else "<d", out, slot.offset, value)
    return bytes(out), f"float value at {slot.offset} := {value}"


def _tensor_offset(rng: random.Random, blob: bytes, layout: Layout) -> int:
    others = [t.offset for t in layout.tensors]
    data_size = len(blob) - layout.data_start
    return (
        rng.choice(
            [
                rng.choice(others),  # overlaps another tensor
                rng.choice(others) + rng.choice([1, 2, 4, 8, 16]),  # unaligned
                data_size,
                data_size + layout.alignment,
                2**63,
                2**64 - 1,
                2**64 - layout.data_start,
                rng.randrange(data_size + 1),
            ]
        )
        % 2**64
    )


def tensor_type(rng: random.Random, blob: bytes, layout: Layout) -> tuple[bytes, str]:
    # Valid types of other sizes (F32 0, F16 1, Q4_0 2, Q8_0 8, Q4_K 12, I8 24, I32 26,
    # BF16 30), removed ones (4, 5) and unknown ones.
    slot = rng.choice([s for s in layout.slots if s.kind == "tensor_type"])
    value = rng.choice([0, 1, 2, 4, 5, 8, 12, 24, 26, 30, 31, 39, 40, 1000, 2**32 - 1])
    out = bytearray(blob)
    struct.pack_into("<I", out, slot.offset, value)
    return bytes(out), f"tensor_type at {slot.offset} := {value}"


def tensor_dims(rng: random.Random, blob: bytes, layout: Layout) -> tuple[bytes, str]:
    tensors = [TensorInfo(t.name, list(t.dims), t.ggml_type, t.offset) for t in layout.tensors]
    victim = rng.choice(tensors)
    choice = rng.randrange(4)
    if choice == 0:
        victim.dims = list(rng.choice(tensors).dims)
    elif choice == 1:
        victim.dims = victim.dims[::-1]
    elif choice == 2:
        victim.dims = victim.dims + [rng.choice([1, 2, 2**32])]
    else:
        victim.dims = [rng.choice([0, 1, 2**31, 2**32 + 1, 2**62]) for _ in victim.dims]
    edited = Layout(layout.version, layout.kvs, tensors, layout.data, alignment=layout.alignment)
    return build(edited), f"dims of {victim.name.decode()} := {victim.dims}"


def duplicate_kv(rng: random.Random, blob: bytes, layout: Layout) -> tuple[bytes, str]:
    kvs = list(layout.kvs)
    kv = rng.choice(kvs)
    kvs.insert(rng.randrange(len(kvs) + 1), kv)
    edited = Layout(layout.version, kvs, layout.tensors, layout.data, alignment=layout.alignment)
    return build(edited), f"duplicate key {kv.key}"


def drop_kv(rng: random.Random, blob: bytes, layout: Layout) -> tuple[bytes, str]:
    kvs = list(layout.kvs)
    kv = kvs.pop(rng.randrange(len(kvs)))
    edited = Layout(layout.version, kvs, layout.tensors, layout.data, alignment=layout.alignment)
    return build(edited), f"drop key {kv.key}"


def duplicate_tensor_name(rng: random.Random, blob: bytes, layout: Layout) -> tuple[bytes, str]:
    tensors = [TensorInfo(t.name, t.dims, t.ggml_type, t.offset) for t in layout.tensors]
    a, b = rng.sample(range(len(tensors)), 2)
    tensors[b].name = tensors[a].name
    edited = Layout(layout.version, layout.kvs, tensors, layout.data, alignment=layout.alignment)
    return build(edited), f"tensor {b} renamed to {tensors[a].name.decode()}"


def drop_tensor(rng: random.Random, blob: bytes, layout: Layout) -> tuple[bytes, str]:
    tensors = list(layout.tensors)
    gone = tensors.pop(rng.randrange(len(tensors)))
    edited = Layout(layout.version, layout.kvs, tensors, layout.data, alignment=layout.alignment)
    return build(edited), f"drop tensor {gone.name.decode()}"


def alignment(rng: random.Random, blob: bytes, layout: Layout) -> tuple[bytes, str]:
    value = rng.choice([0, 1, 3, 7, 8, 16, 24, 64, 4096, 2**31, 2**32 - 1])
    kvs = [kv for kv in layout.kvs if kv.key != "general.alignment"]
    kvs.insert(rng.randrange(len(kvs) + 1), kv_u32("general.alignment", value))
    edited = Layout(layout.version, kvs, layout.tensors, layout.data, alignment=layout.alignment)
    # Padding as a writer honouring the new value would lay it out, where that is sane.
    return build(edited, alignment=value if rng.random() < 0.5 else None), (
        f"general.alignment := {value}"
    )


MUTATIONS = {
    "flip": (flip_bytes, 3),
    "truncate": (truncate, 3),
    "string/array length": (lambda r, b, lay: set_slot(r, b, lay, ("str_len", "arr_count")), 3),
    "value/array type": (lambda r, b, lay: set_slot(r, b, lay, ("kv_type", "arr_type")), 2),
    "header count": (lambda r, b, lay: set_slot(r, b, lay, ("n_tensors", "n_kv", "version")), 1),
    "dims": (lambda r, b, lay: set_slot(r, b, lay, ("dim", "n_dims")), 3),
    "tensor dims swap": (tensor_dims, 2),
    "tensor offset": (lambda r, b, lay: set_slot(r, b, lay, ("tensor_offset",)), 3),
    "tensor type": (tensor_type, 3),
    "numeric value": (lambda r, b, lay: set_slot(r, b, lay, ("value",)), 4),
    "duplicate key": (duplicate_kv, 1),
    "drop key": (drop_kv, 2),
    "duplicate tensor name": (duplicate_tensor_name, 1),
    "drop tensor": (drop_tensor, 1),
    "alignment": (alignment, 2),
}


def mutate(seed_blob: bytes, case: int) -> tuple[bytes, str, str]:
    """Case `case` of the seed: (mutated bytes, mutation family, what was done)."""
    rng = random.Random(case)
    layout = parse(seed_blob)
    names = list(MUTATIONS)
    family = rng.choices(names, weights=[MUTATIONS[n][1] for n in names])[0]
    blob, what = MUTATIONS[family][0](rng, seed_blob, layout)
    if rng.random() < 0.15 and family not in ("truncate",):
        # A second, independent damage on top: loaders often survive one but not two.
        try:
            second = rng.choice([n for n in names if n != "truncate"])
            blob2, what2 = MUTATIONS[second][0](rng, blob, parse(blob))
            blob, what = blob2, f"{what}; {what2}"
        except Exception:  # the first damage made the file unparseable for the mutator
            pass
    return blob, family, what
