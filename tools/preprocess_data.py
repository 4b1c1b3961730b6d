"""Tokenize a text corpus into megatron-core IndexedDataset files: `{output_prefix}_{key}_document.bin/.idx`.

Same flags and output naming as Megatron-LM's tools/preprocess_data.py; the files are written by megatron-core's
IndexedDatasetBuilder, so Megatron-LM and this project read each other's data.

    python tools/preprocess_data.py --input corpus/ --output-prefix data/corpus \
        --tokenizer-type GPT2BPETokenizer --vocab-file examples/data/gpt2/encoder.json \
        --merge-file examples/data/gpt2/vocab.bpe --append-eod --workers 8

Input: `--input` takes files, globs or directories (searched recursively, sorted by path), of
    *.jsonl / *.json   one JSON object per line; each --json-keys key is one document stream
    *.txt              one document per file (--txt-documents file) or per blank-line-separated block
optionally compressed as .gz or .zst. A document's ids are tokenize(text) (+ [eod] with --append-eod); the .bin
holds the ids of all documents back to back, dtype uint16 when the vocabulary has < 65500 ids, int32 otherwise.

Parallelism: the input is cut into `--partitions` contiguous groups of files, processed concurrently, each by
workers/partitions tokenizer processes fed batches of raw lines in order (Pool.imap), and the partial datasets are
concatenated in input order. The output is therefore byte-identical for any --workers / --partitions.

Robustness: a malformed JSON line, a line without a key, a non-string value, undecodable UTF-8 or an empty
document is skipped and counted (the summary gives the first line numbers). A missing or unreadable input, an empty
input, or an output directory that does not exist stops the run with one `error:` line (exit 2). Results are
written under temporary names and renamed at the very end (.bin first, .idx last), so an interrupted run leaves
no `.idx` that looks complete and never clobbers a previous good output.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_cocomix.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before megatron-core and transformers are imported

from megatron_cocomix.data.corpus import is_text_file, open_binary, resolve_inputs  # noqa: E402
from megatron_cocomix.data.tokenizer import add_tokenizer_args, build_tokenizer_from_flags  # noqa: E402
from megatron_cocomix.errors import cli_main  # noqa: E402

BATCH_LINES = 64  # raw lines per task sent to a worker: large enough to amortise pickling, small for balance
MAX_REPORTED_SKIPS = 5


class PreprocessError(ValueError):
    """A bad input or flag; the message is one line naming the file or flag."""


@dataclass
class Task:
    """A batch of raw input: lines of a JSON file, or documents of a text file, plus where they come from."""

    file: str
    first_line: int
    kind: str  # "json" | "text"
    items: List[Tuple[int, bytes]]  # (line number, raw bytes)


def _damage_errors() -> tuple:
    import zstandard

    return (EOFError, OSError, zstandard.ZstdError)


def _numbered_lines(stream, path: str, progress: "Progress") -> Iterator[Tuple[int, bytes]]:
    """(line number, line) until the end, or until a corrupt / truncated compressed stream (then warn and stop)."""
    try:
        yield from enumerate(stream, 1)
    except _damage_errors() as e:
        progress.warn(f"{path}: input stream ends early ({e}); kept the documents before the damage")


def read_tasks(files: Sequence[str], txt_documents: str, progress: "Progress") -> Iterator[Task]:
    """Stream the inputs as tasks, in input order. A corrupt compressed stream ends that file with a warning."""
    for path in files:
        raw, stream = open_binary(path)
        text = is_text_file(path)
        kind = "text" if text else "json"
        try:
            if text and txt_documents == "file":
                try:
                    content = stream.read()
                except _damage_errors() as e:
                    progress.warn(f"{path}: cannot decompress ({e}); file skipped")
                    continue
                yield Task(path, 1, kind, [(1, content)])
                progress.add_bytes(raw.tell())
                continue
            block: List[Tuple[int, bytes]] = []
            pending: List[bytes] = []  # lines of the current blank-line-separated text block
            pending_start = last_pos = 0
            for line_no, line in _numbered_lines(stream, path, progress):
                if text:
                    if line.strip():
                        if not pending:
                            pending_start = line_no
                        pending.append(line)
                        continue
                    if pending:
                        block.append((pending_start, b"".join(pending).rstrip(b"\r\n")))
                        pending = []
                elif line.strip():
                    block.append((line_no, line))
                if len(block) >= BATCH_LINES:
                    yield Task(path, block[0][0], kind, block)
                    block = []
                    pos = raw.tell()
                    progress.add_bytes(pos - last_pos)
                    last_pos = pos
            if pending:
                block.append((pending_start, b"".join(pending).rstrip(b"\r\n")))
            if block:
                yield Task(path, block[0][0], kind, block)
            progress.add_bytes(raw.tell() - last_pos)
        finally:
            stream.close()
            raw.close()


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer workers.

_worker_tokenizer = None
_worker_options: dict = {}


def init_worker(tokenizer_flags: dict, options: dict) -> None:
    global _worker_tokenizer, _worker_options
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate() must end a worker quietly
    _worker_tokenizer = build_tokenizer_from_flags(**tokenizer_flags)
    _worker_options = options


def encode_task(task: Task) -> Tuple[List[List[List[int]]], List[Tuple[str, int, str]]]:
    """Decode, parse and tokenize one task: ([per document: per key: ids], [(file, line, reason) skipped])."""
    keys, append_eod = _worker_options["json_keys"], _worker_options["append_eod"]
    texts: List[List[str]] = []
    skipped: List[Tuple[str, int, str]] = []
    for line_no, raw in task.items:
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append((task.file, line_no, "invalid UTF-8"))
            continue
        if task.kind == "text":
            fields = [decoded]
        else:
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError:
                skipped.append((task.file, line_no, "malformed JSON"))
                continue
            if not isinstance(record, dict):
                skipped.append((task.file, line_no, "not a JSON object"))
                continue
            missing = [k for k in keys if k not in record]
            if missing:
                skipped.append((task.file, line_no, f"no key '{missing[0]}'"))
                continue
            fields = [record[k] for k in keys]
            if not all(isinstance(v, str) for v in fields):
                skipped.append((task.file, line_no, "value is not a string"))
                continue
        if not all(v.strip() for v in fields):
            skipped.append((task.file, line_no, "empty document"))
            continue
        texts.append(fields)
    tokenizer = _worker_tokenizer
    batch = getattr(tokenizer, "tokenize_batch", None)
    per_key = [batch([t[k] for t in texts]) if batch else [tokenizer.tokenize(t[k]) for t in texts]
               for k in range(len(keys))]
    documents = []
    for d in range(len(texts)):
        ids = [list(per_key[k][d]) + ([tokenizer.eod] if append_eod else []) for k in range(len(keys))]
        documents.append(ids)
    return documents, skipped


# ----------------------------------------------------------------------------------------------------------------
# Progress and statistics.


class Progress:
    """Documents, tokens and input MB/s: a tqdm bar on a terminal, a log line every --log-interval documents else."""

    def __init__(self, total_bytes: int, log_interval: int, shared=None, quiet: bool = False) -> None:
        self.shared = shared  # multiprocessing Array [docs, tokens, bytes] when partitions run in children
        self.docs = self.tokens = self.bytes = 0
        self.log_interval, self.quiet = log_interval, quiet
        self.start = time.time()
        self.next_log = log_interval
        self.bar = None
        if shared is None and not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr)

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        if self.shared is not None:
            with self.shared.get_lock():
                self.shared[2] += n
        elif self.bar is not None:
            self.bar.update(n)

    def add(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.shared is not None:
            with self.shared.get_lock():
                self.shared[0] += docs
                self.shared[1] += tokens
            return
        self.show(self.docs, self.tokens, self.bytes)

    def show(self, docs: int, tokens: int, nbytes: int, force: bool = False) -> None:
        elapsed = max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix(docs=docs, tokens=tokens, tok_s=f"{tokens / elapsed:.0f}", refresh=False)
        elif not self.quiet and (force or docs >= self.next_log):
            self.next_log = (docs // self.log_interval + 1) * self.log_interval
            print(f"processed {docs} documents, {tokens} tokens ({tokens / elapsed:.0f} tokens/s, "
                  f"{nbytes / elapsed / 1e6:.2f} MB/s input)", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Stats:
    documents: int = 0
    tokens: Dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    skip_reasons: Dict[str, int] = field(default_factory=dict)
    first_skips: List[Tuple[str, int, str]] = field(default_factory=list)
    dtype: str = ""
    outputs: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def merge(self, other: "Stats") -> None:
        self.documents += other.documents
        for k, v in other.tokens.items():
            self.tokens[k] = self.tokens.get(k, 0) + v
        self.skipped += other.skipped
        for k, v in other.skip_reasons.items():
            self.skip_reasons[k] = self.skip_reasons.get(k, 0) + v
        self.first_skips = (self.first_skips + other.first_skips)[:MAX_REPORTED_SKIPS]


# ----------------------------------------------------------------------------------------------------------------
# One partition: a contiguous group of files -> one dataset per key.


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def process_partition(files: Sequence[str], out_prefixes: Dict[str, str], tokenizer_flags: dict, options: dict,
                      workers: int, dtype, progress: Progress) -> Stats:
    """Tokenize `files` into `{out_prefixes[key]}.bin/.idx` (complete only when this returns)."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    keys = options["json_keys"]
    builders = {k: IndexedDatasetBuilder(out_prefixes[k] + ".bin", dtype=dtype) for k in keys}
    stats = Stats(tokens={k: 0 for k in keys})
    tasks = read_tasks(files, options["txt_documents"], progress)
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.Pool(workers, initializer=init_worker, initargs=(tokenizer_flags, options))
            results = pool.imap(encode_task, tasks, chunksize=4)
        else:
            init_worker(tokenizer_flags, options)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            results = map(encode_task, tasks)
        for documents, skipped in results:
            new_tokens = 0
            for ids_per_key in documents:
                for key, ids in zip(keys, ids_per_key):
                    array = numpy.asarray(ids, dtype=dtype)
                    builders[key].add_document(array, [array.size])
                    stats.tokens[key] += array.size
                    new_tokens += array.size
            stats.documents += len(documents)
            for file, line_no, reason in skipped:
                stats.skipped += 1
                stats.skip_reasons[reason] = stats.skip_reasons.get(reason, 0) + 1
                if len(stats.first_skips) < MAX_REPORTED_SKIPS:
                    stats.first_skips.append((file, line_no, reason))
            progress.add(len(documents), new_tokens)
        for key in keys:
            builders[key].finalize(out_prefixes[key] + ".idx")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for builder in builders.values():
            builder.data_file.close()
    return stats


def _partition_child(index, files, out_prefixes, tokenizer_flags, options, workers, dtype, shared, queue) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        stats = process_partition(files, out_prefixes, tokenizer_flags, options, workers, dtype,
                                  Progress(0, 1, shared=shared, quiet=True))
        queue.put((index, "ok", stats))
    except BaseException as e:  # reported by the parent, which removes the partial files
        queue.put((index, "error", f"{type(e).__name__}: {e}"))


def split_into_partitions(files: Sequence[str], partitions: int) -> List[List[str]]:
    """Contiguous groups of files with roughly equal bytes (order kept, so concatenation restores the input)."""
    partitions = max(1, min(partitions, len(files)))
    sizes = [os.path.getsize(f) for f in files]
    total, groups, current, acc = sum(sizes), [], [], 0
    for i, (path, size) in enumerate(zip(files, sizes)):
        current.append(path)
        acc += size
        groups_left = partitions - len(groups) - 1
        files_left = len(files) - i - 1
        if groups_left > 0 and (acc >= total * (len(groups) + 1) / partitions or files_left == groups_left):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Tokenize jsonl/txt corpora into megatron-core .bin/.idx datasets.",
                                     allow_abbrev=False)
    g = parser.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="Input files, globs or directories: .jsonl/.json/.txt, optionally .gz/.zst.")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to extract; one output per key.")
    g.add_argument("--txt-documents", choices=["file", "blank-line"], default="file",
                   help=".txt inputs: one document per file, or per blank-line-separated block.")
    g = parser.add_argument_group("tokenizer")
    add_tokenizer_args(g)
    g.add_argument("--append-eod", action="store_true", help="Append the end-of-document token to each document.")
    g = parser.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="Writes {prefix}_{key}_document.bin/.idx.")
    g = parser.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="Tokenizer processes (in total over partitions).")
    g.add_argument("--partitions", type=int, default=1,
                   help="Contiguous groups of input files processed concurrently, then concatenated.")
    g.add_argument("--log-interval", type=int, default=1000, help="Documents between progress lines (no terminal).")
    g.add_argument("--quiet", "--no-progress", action="store_true", dest="quiet",
                   help="No progress bar or progress lines, only the summary.")
    return parser


def run(args: argparse.Namespace) -> Stats:
    """Preprocess; raises PreprocessError / ValueError / FileNotFoundError with a one-line message."""
    import numpy
    from megatron.core.datasets.indexed_dataset import DType

    from megatron_cocomix.data.datasets import validate_indexed_dataset

    for flag in ("workers", "partitions", "log_interval"):
        if getattr(args, flag) < 1:
            raise PreprocessError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.tokenizer_type is None:
        raise PreprocessError("--tokenizer-type is required")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise PreprocessError(f"--output-prefix {args.output_prefix}: directory {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK):
        raise PreprocessError(f"--output-prefix {args.output_prefix}: directory {out_dir} is not writable")
    files = resolve_inputs(args.input)
    if any(is_text_file(f) for f in files) and len(args.json_keys) != 1:
        raise PreprocessError(f"--json-keys {' '.join(args.json_keys)}: .txt inputs give one document stream, "
                              f"use a single key")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise PreprocessError(f"--json-keys {' '.join(args.json_keys)}: duplicate key")

    # Rust tokenizers would otherwise spread each worker over all cores: one process = one core, as --workers says.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer_flags = dict(tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
                           merge_file=args.merge_file, tokenizer_model=args.tokenizer_model,
                           vocab_size=args.vocab_size)
    tokenizer = build_tokenizer_from_flags(**tokenizer_flags)  # fail fast, in the parent, on bad tokenizer flags
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    options = dict(json_keys=list(args.json_keys), append_eod=args.append_eod, txt_documents=args.txt_documents)

    finals = {k: output_prefix(args.output_prefix, k) for k in args.json_keys}
    tag = f".incomplete-{os.getpid()}"
    groups = split_into_partitions(files, args.partitions)
    part_prefixes = [{k: f"{finals[k]}{tag}-part{i}" for k in args.json_keys} for i in range(len(groups))]
    temporary = [p + s for parts in part_prefixes for p in parts.values() for s in (".bin", ".idx")]
    temporary += [finals[k] + tag + s for k in args.json_keys for s in (".bin", ".idx")]

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    total_bytes = sum(os.path.getsize(f) for f in files)
    progress = Progress(total_bytes, args.log_interval, quiet=args.quiet)
    stats = Stats(tokens={k: 0 for k in args.json_keys})
    try:
        if len(groups) == 1:
            stats.merge(process_partition(groups[0], part_prefixes[0], tokenizer_flags, options, args.workers,
                                          dtype, progress))
        else:
            stats.merge(_run_partitions(groups, part_prefixes, tokenizer_flags, options, args, dtype, progress))
        if stats.documents == 0:
            raise PreprocessError(f"--input {' '.join(args.input)}: no documents ({stats.skipped} lines skipped"
                                  f"{_describe_skips(stats)})")
        for key in args.json_keys:
            merged = finals[key] + tag
            if len(groups) == 1:
                os.replace(part_prefixes[0][key] + ".bin", merged + ".bin")
                os.replace(part_prefixes[0][key] + ".idx", merged + ".idx")
            else:
                from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

                builder = IndexedDatasetBuilder(merged + ".bin", dtype=dtype)
                for parts in part_prefixes:
                    builder.add_index(parts[key])
                builder.finalize(merged + ".idx")
            validate_indexed_dataset(merged, vocab_size=tokenizer.vocab_size)
        # Commit: drop any old .idx first, then .bin, then .idx, so no moment pairs an .idx with the wrong .bin.
        for key in args.json_keys:
            _remove([finals[key] + ".idx"])
            os.replace(finals[key] + tag + ".bin", finals[key] + ".bin")
            os.replace(finals[key] + tag + ".idx", finals[key] + ".idx")
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, previous_handler)
        _remove(temporary)
    progress.show(stats.documents, sum(stats.tokens.values()), total_bytes, force=True)
    stats.dtype = numpy.dtype(dtype).name
    stats.outputs = finals
    stats.seconds = time.time() - progress.start
    return stats


def _run_partitions(groups, part_prefixes, tokenizer_flags, options, args, dtype, progress) -> Stats:
    shared = multiprocessing.Array("q", 3)
    queue = multiprocessing.Queue()
    workers_each = max(1, args.workers // len(groups))
    children = [multiprocessing.Process(target=_partition_child, args=(i, files, parts, tokenizer_flags, options,
                                                                       workers_each, dtype, shared, queue))
                for i, (files, parts) in enumerate(zip(groups, part_prefixes))]
    for child in children:
        child.start()
    results = []
    try:
        while len(results) < len(children):
            try:
                results.append(queue.get(timeout=0.5))
            except Exception:
                if any(c.exitcode not in (None, 0) for c in children):
                    raise PreprocessError("a partition process died (killed or out of memory)") from None
            progress.show(shared[0], shared[1], shared[2])
            if progress.bar is not None:
                progress.bar.n = shared[2]
                progress.bar.refresh()
    finally:
        for child in children:
            if child.is_alive() and len(results) < len(children):
                child.terminate()
            child.join()
    total = Stats(tokens={k: 0 for k in options["json_keys"]})
    for _, status, payload in sorted(results, key=lambda r: r[0]):  # input order, whatever order they finished
        if status == "error":
            raise PreprocessError(f"partition failed: {payload}")
        total.merge(payload)
    return total


def _describe_skips(stats: Stats) -> str:
    if not stats.skipped:
        return ""
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(stats.skip_reasons.items()))
    first = ", ".join(f"{f}:{line} ({r})" for f, line, r in stats.first_skips)
    return f": {reasons}; first: {first}"


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = run(args)
    except KeyboardInterrupt:
        print("error: interrupted; no output written (temporary files removed)", file=sys.stderr)
        return 130
    for key, prefix in stats.outputs.items():
        print(f"wrote {prefix}.bin/.idx: {stats.documents} documents, {stats.tokens[key]} tokens ({stats.dtype})")
    if stats.skipped:
        print(f"skipped {stats.skipped} lines{_describe_skips(stats)}")
    total = sum(stats.tokens.values())
    print(f"{total} tokens in {stats.seconds:.1f} s ({total / max(stats.seconds, 1e-9):.0f} tokens/s, "
          f"{args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
