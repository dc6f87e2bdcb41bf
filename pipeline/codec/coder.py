"""The cascade as a lossless image codec: range coding of every sub-pixel with the model's
categorical distribution, in the cascade's own order (first slice, size SPN slice by slice,
depth SPN slice by slice), with `constriction`'s range coder (first in, first out, as an
autoregressive model needs).

An exact likelihood is a file size: coding x costs -log2 p(x) bits plus the quantisation of
the probabilities to the coder's fixed point and a few bytes of framing.

The encoder and the decoder must see bit-identical probabilities, on any machine: both compute
them through one function, `code_chunk`, in the pinned float arithmetic of `stages.canonical`
(fixed order of every sum, correctly rounded IEEE-754 operations only, no fused multiply-add),
which gives the same bits on every CPU kind whatever its vector instructions, thread count or
BLAS; fed the true values on the encoder's side and the decoded ones on the decoder's side, on
chunks of `chunk` images whose size is stored in the file (the last chunk padded with zero images
that are computed but not coded). The chunks are independent, so both sides code them in forked
processes side by side (`pipeline.inference.processes`); the bytes are the same for any number.

Before any work the decoder recomputes a probe (the probabilities of a few fixed steps of every
stage) and refuses the file in one line if its digest differs from the stored one; after each
chunk it compares the chunk's CRC-32, so a decode that went astray stops at its first chunk.

Container (all integers little-endian):

    b"SPNC" | version u8 | H u16 | W u16 | C u8 | bits u8 | high bits u8 | S u8 | N u32 | chunk u16
    | model digest (32 bytes, SHA-256 of every stage's hyperparameters and weights)
    | probe digest (8 bytes, SHA-256 of the pinned probabilities of `probe`)
    | image digest (16 bytes, SHA-256 of the n-bit images) | names length u32 | names (zlib, JSON)
    | per chunk: u32 word count, u32 CRC-32 of its n-bit images (uint8) | the chunks' range-coded words (u32 each)
    | CRC-32 of all before, u32
"""
from __future__ import annotations

import copy
import hashlib
import json
import struct
import zlib

import numpy as np
import torch

from data.transforms import from_sequence, from_slices, merge_depth, to_sequence
from pipeline.checkpoints import weights_digest
from pipeline.inference.processes import in_processes
from pipeline.progress import progress_bar
from stages import canonical

MAGIC = b"SPNC"
VERSION = 3  # 3: probabilities in the pinned arithmetic of stages/canonical.cpp, a probe digest, chunk CRCs
HEAD = struct.Struct("<4sBHHBBBBIH")
CHUNK = 16  # images coded together (stored in the file; the decoder follows the file)


class CodecError(ValueError):
    """A container that cannot be decoded here; the message says why and what to do."""


def model_digest(cascade) -> bytes:
    """SHA-256 over the stages (by name) and their weights: which exact checkpoints a file needs."""
    digest = hashlib.sha256()
    for name in sorted(cascade.stages):
        digest.update(name.encode() + bytes.fromhex(weights_digest(cascade.stages[name])))
    return digest.digest()


def image_digest(images: torch.Tensor) -> bytes:
    return hashlib.sha256(images.to(torch.uint8).contiguous().numpy().tobytes()).digest()[:16]


def on_cpu(cascade):
    """The cascade on the CPU (a copy when it is elsewhere): a file compressed on a GPU machine
    must decode on a CPU one, so both sides compute the probabilities on a CPU."""
    return cascade if cascade.device.type == "cpu" else copy.deepcopy(cascade).to("cpu")


def valid_names(names) -> bool:
    """Names stored in a file become file names (`<name>.png`): plain names only, never a path, no
    NUL, and short enough for a file system (255 bytes with the suffix)."""
    return isinstance(names, list) and all(
        isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
        and len(name.encode("utf-8", "surrogatepass")) <= 250 for name in names)


@torch.no_grad()
def code_chunk(cascade, images: torch.Tensor | None, real: int, coder, encode: bool) -> torch.Tensor:
    """Encode (`encode`, images given) or decode one chunk of CHUNK images through `coder`, with the
    probabilities of `stages.canonical`.

    images: n-bit (CHUNK, H, W, C) when encoding (rows >= real are padding, not coded), else None.
    Returns the chunk's n-bit images (CHUNK, H, W, C). A stream that does not decode under these
    probabilities raises CodecError.
    """
    import constriction

    model = constriction.stream.model.Categorical(perfect=False)
    chunk = CHUNK
    shape = (chunk, cascade.S**2, cascade.h, cascade.w, cascade.C)
    truth = cascade.known(images) if encode else None
    known = {"msb": torch.zeros(shape, dtype=torch.long), "lsb": torch.zeros(shape, dtype=torch.long)}
    for stage_name, part, k, _ in cascade.plan():  # the cascade's order: stage, part, slice, what it reads
        stage = cascade.stages[stage_name]
        decoder = stage.decoder
        step = canonical.Decoder(decoder, canonical.context(stage, known, torch.full((chunk,), k)), chunk)
        values = torch.zeros(chunk, decoder.cfg.length, dtype=torch.long)
        target = to_sequence(truth[part][:, k]) if encode else None  # (chunk, T)
        previous = torch.full((chunk,), decoder.start_token, dtype=torch.long)
        for t in range(decoder.cfg.length):
            p = step.step(previous, t)[:real].numpy()  # (real, V) float64
            if encode:
                symbols = target[:, t]
                coder.encode(symbols[:real].numpy().astype(np.int32), model, p)
            else:
                symbols = torch.zeros(chunk, dtype=torch.long)
                try:
                    symbols[:real] = torch.from_numpy(coder.decode(model, p).astype(np.int64))
                except (AssertionError, ValueError, RuntimeError) as error:  # constriction's word for a bad stream
                    raise CodecError(f"the coded data does not decode ({' '.join(str(error).split())[:120]})") \
                        from error
            values[:, t] = previous = symbols
        known[part][:, k] = from_sequence(values, cascade.h, cascade.w)
    return merge_depth(from_slices(known["msb"], cascade.S), from_slices(known["lsb"], cascade.S),
                       cascade.bits, cascade.high_bits)


@torch.no_grad()
def probe(cascade) -> bytes:
    """8 bytes: SHA-256 of the pinned probabilities of the first steps of every stage of the cascade on
    a fixed input (a ramp of values in every slice, so that the context stack's scaling is in it too).
    Two machines whose pinned arithmetic differs on this input get different probes (up to a hash
    collision); the decoder checks it before any work, the chunk CRCs catch the rest."""
    digest = hashlib.sha256()
    shape = (1, cascade.S**2, cascade.h, cascade.w, cascade.C)
    ramp = torch.arange(torch.Size(shape).numel()).view(shape)
    known = {"msb": ramp % 2**cascade.high_bits, "lsb": ramp % 2**(cascade.bits - cascade.high_bits)}
    for stage_name in sorted(cascade.stages):
        stage = cascade.stages[stage_name]
        k = torch.tensor(stage.modelled_slices()[-1:])
        step = canonical.Decoder(stage.decoder, canonical.context(stage, known, k), 1)
        previous = torch.tensor([stage.decoder.start_token])
        for t in range(min(4, stage.decoder.cfg.length)):
            digest.update(step.step(previous, t).numpy().tobytes())
            previous = torch.tensor([t % stage.decoder.cfg.n_values])
    return digest.digest()[:8]


def chunk_crc(images: torch.Tensor) -> int:
    """CRC-32 of a chunk's n-bit images (as uint8)."""
    return zlib.crc32(images.to(torch.uint8).contiguous().numpy().tobytes())


def compress(cascade, images: torch.Tensor, names: list[str] | None = None, progress: bool = False,
             workers: int | None = None) -> bytes:
    """Losslessly compress n-bit images (N, H, W, C) with the cascade; returns the container bytes.

    `names` (optional) are kept in the file, for decompressing to a folder of the same names.
    Raises ValueError for images of another shape, values beyond the cascade's n bits, or names
    that are not one plain file name per image, CanonicalUnavailable (an OSError) where the pinned
    arithmetic cannot be built. Runs on the CPU (a copy of a cascade elsewhere), in
    `workers` processes (`pipeline.inference.processes.in_processes`); the bytes are the same for any number.
    Source: the cascade's factorisation (Menick & Kalchbrenner 2019; README) driving a range coder.
    """
    import constriction

    canonical.load()  # CanonicalUnavailable (no C++ compiler) before any work
    cascade = on_cpu(cascade)
    images = torch.as_tensor(images).cpu()  # kept in its own dtype (uint8 from make evaluate); chunks as long
    if images.dim() != 4 or tuple(images.shape[1:]) != cascade.shape:
        raise ValueError(f"images have shape {tuple(images.shape)}, the model codes (N, {cascade.shape})")
    if images.is_floating_point() or images.dtype == torch.bool:
        raise ValueError(f"images must be integers, not {images.dtype}")
    if images.numel() and (int(images.min()) < 0 or int(images.max()) >= 2**cascade.bits):  # ints: uint8 wraps
        raise ValueError(f"image values must be {cascade.bits}-bit integers, 0 .. {2**cascade.bits - 1}")
    if names and (len(names) != len(images) or not valid_names(list(names))):
        raise ValueError("names must be one plain file name (no folder) per image")
    n = len(images)
    def encode(starts, progress) -> list[bytes]:  # starts: the first image of each chunk of one process
        streams = []
        for start in starts:
            real = min(CHUNK, n - start)
            chunk = torch.zeros((CHUNK, *cascade.shape), dtype=torch.long)
            chunk[:real] = images[start:start + real]
            coder = constriction.stream.queue.RangeEncoder()
            code_chunk(cascade, chunk, real, coder, encode=True)
            streams.append(coder.get_compressed().astype("<u4").tobytes())
            progress.update(real)
        return streams

    bar = progress_bar(n, "compressing", "image", disable=not progress)
    streams = [stream for share in in_processes(encode, range(0, n, CHUNK), bar, workers=workers)
               for stream in share]
    bar.close()
    names_blob = zlib.compress(json.dumps(list(names or [])).encode())
    body = b"".join([
        HEAD.pack(MAGIC, VERSION, cascade.height, cascade.width, cascade.C, cascade.bits, cascade.high_bits,
                  cascade.S, n, CHUNK),
        model_digest(cascade), probe(cascade), image_digest(images), struct.pack("<I", len(names_blob)), names_blob,
        b"".join(struct.pack("<II", len(stream) // 4, chunk_crc(images[start:start + CHUNK]))
                 for stream, start in zip(streams, range(0, n, CHUNK))), *streams])
    return body + struct.pack("<I", zlib.crc32(body))


def read_header(data: bytes, cascade=None) -> dict:
    """Parse and check a container; raises CodecError naming what is wrong."""
    if data[:4] != MAGIC:
        raise CodecError("not a compressed image file of this project (no SPNC header)")
    if len(data) < HEAD.size + 4:
        raise CodecError("the file is damaged or truncated (shorter than a header); nothing was decoded")
    magic, version, height, width, channels, bits, high_bits, subscale, n, chunk = HEAD.unpack_from(data)
    if version != VERSION:
        raise CodecError(f"format version {version}; this version of the project reads version {VERSION}: "
                         f"decompress with the version that wrote it")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise CodecError("the file is damaged or truncated (checksum mismatch); nothing was decoded")
    if n and not chunk:
        raise CodecError("the file's header is invalid (0 images per chunk); nothing was decoded")
    pos = HEAD.size
    model, probe_digest, images_digest = data[pos:pos + 32], data[pos + 32:pos + 40], data[pos + 40:pos + 56]
    try:
        (names_length,) = struct.unpack_from("<I", data, pos + 56)
        pos += 60
        names = json.loads(zlib.decompress(data[pos:pos + names_length]))
        pos += names_length
        chunks = -(-n // chunk) if n else 0
        table = struct.unpack_from(f"<{2 * chunks}I", data, pos)
        counts, crcs = table[0::2], table[1::2]
        pos += 8 * chunks
    except (struct.error, zlib.error, ValueError) as error:  # ValueError covers bad JSON and text
        raise CodecError(f"the file's header is invalid ({error}); nothing was decoded") from error
    if not valid_names(names) or (names and len(names) != n):
        raise CodecError("the file's image names are invalid (not plain file names); nothing was decoded")
    if pos + 4 * sum(counts) > len(body):
        raise CodecError("the file is shorter than its header says (truncated); nothing was decoded")
    header = dict(shape=(height, width, channels), bits=bits, high_bits=high_bits, subscale=subscale, n=n,
                  chunk=chunk, model=model, probe=probe_digest, images_digest=images_digest, names=names,
                  counts=counts, crcs=crcs, start=pos)
    if cascade is not None:
        geometry = ((height, width, channels), bits, high_bits, subscale)
        if geometry != (cascade.shape, cascade.bits, cascade.high_bits, cascade.S) or model != model_digest(cascade):
            raise CodecError("the file was compressed with another model than this run's checkpoints: decompress "
                             "with the experiment and run folder that compressed it (EXP=..., RUN_DIR=...)")
        if chunk != CHUNK:
            raise CodecError(f"the file codes {chunk} images at a time; this version codes {CHUNK}: "
                             f"decompress with the version that wrote it")
        if probe(cascade) != probe_digest:
            raise CodecError("this machine computes the codec's probabilities differently from the one that "
                             "compressed the file (its C++ build does not keep IEEE-754 float32 arithmetic "
                             "exactly, see stages/canonical.cpp); nothing was decoded")
    return header


def decompress(cascade, data: bytes, progress: bool = False, workers: int | None = None
               ) -> tuple[torch.Tensor, list[str]]:
    """The n-bit images (N, H, W, C) long and their names from `compress`'s bytes, bit for bit.
    Raises CodecError for another model, a damaged or truncated file, an unknown version, a machine
    whose pinned arithmetic gives another probe digest (before any work), or a chunk that decodes to
    other images than were encoded (at that chunk: never garbage images); CanonicalUnavailable where
    the pinned arithmetic cannot be built."""
    import constriction

    canonical.load()  # CanonicalUnavailable (no C++ compiler) before any work
    cascade = on_cpu(cascade)
    header = read_header(data, cascade)
    n, pos = header["n"], header["start"]
    streams = []  # (first image, the chunk's words, its CRC-32)
    for index, start in enumerate(range(0, n, CHUNK)):
        words = header["counts"][index]
        streams.append((start, np.frombuffer(data, dtype="<u4", count=words, offset=pos).astype(np.uint32),
                        header["crcs"][index]))
        pos += 4 * words

    def decode(chunks, progress) -> torch.Tensor:  # chunks: (first image, words, CRC) of one process's chunks
        images = []
        for start, stream, crc in chunks:
            real = min(CHUNK, n - start)
            coder = constriction.stream.queue.RangeDecoder(stream)
            images.append(code_chunk(cascade, None, real, coder, encode=False)[:real])
            if chunk_crc(images[-1]) != crc:
                raise CodecError(f"images {start} to {start + real - 1} decoded differently from how they were "
                                 f"encoded (their CRC-32 differs); the file was altered, or this machine computes "
                                 f"other probabilities: nothing was written")
            progress.update(real)
        return torch.cat(images) if images else torch.zeros((0, *cascade.shape), dtype=torch.long)

    bar = progress_bar(n, "decompressing", "image", disable=not progress)
    out = torch.cat(in_processes(decode, streams, bar, workers=workers))
    bar.close()
    if image_digest(out) != header["images_digest"]:
        raise CodecError("the decoded images do not match the file's digest: the file was altered after "
                         "compression; nothing was written")
    return out, header["names"]
