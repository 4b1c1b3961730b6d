"""Reading raw text corpora: the inputs of tools/preprocess_data.py and tools/train_tokenizer.py.

An input is a file, a glob or a directory of `.jsonl` / `.json` (one JSON object per line, the text under one or
more keys) or `.txt` (one document per file) files, each optionally compressed as `.gz` or `.zst`.
Errors are one line naming the --input value.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from typing import List, Sequence, Tuple

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
COMPRESSED_SUFFIXES = ("", ".gz", ".zst")


def supported(path: str) -> bool:
    return any(path.endswith(s + c) for s in JSON_SUFFIXES + TEXT_SUFFIXES for c in COMPRESSED_SUFFIXES)


def is_text_file(path: str) -> bool:
    return any(path.endswith(s + c) for s in TEXT_SUFFIXES for c in COMPRESSED_SUFFIXES)


def resolve_inputs(specs: Sequence[str]) -> List[str]:
    """Expand files / globs / directories into a sorted, de-duplicated list of readable input files."""
    files: List[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(spec) for name in names
                           if supported(name))
            if not found:
                raise ValueError(f"--input {spec}: directory holds no .jsonl/.json/.txt(.gz/.zst) files")
        elif any(ch in spec for ch in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise ValueError(f"--input {spec}: pattern matches no files")
        elif os.path.isfile(spec):
            found = [spec]
        else:
            raise ValueError(f"--input {spec}: no such file or directory")
        for path in found:
            if not supported(path):
                raise ValueError(f"--input {path}: unsupported file type (expected .jsonl, .json or .txt, "
                                      f"optionally .gz or .zst)")
            if path not in files:
                files.append(path)
    for path in files:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise ValueError(f"--input {path}: cannot read ({e.strerror})") from None
    return files


def open_binary(path: str) -> Tuple[io.BufferedReader, io.BufferedIOBase]:
    """(raw file, decompressed byte stream); the raw file's position measures progress."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    if path.endswith(".zst"):
        import zstandard

        return raw, io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw, raw
