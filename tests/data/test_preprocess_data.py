"""tools/preprocess_data.py: round trips per tokenizer, worker/partition invariance, input formats, bad inputs,
interrupted runs."""

import gzip
import os
import signal
import subprocess
import sys

import numpy
import pytest

from megatron_cocomix.data.tokenizer import build_tokenizer_from_flags
from tests.helpers.data_files import write_jsonl
from tests.helpers.paths import GPT2_FLAGS, GPT2_MERGES, GPT2_VOCAB, ROOT


def read_documents(prefix):
    """Each document's ids, read back through megatron-core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].astype(numpy.int64).tolist() for i in range(len(ds))], ds


def run_tool(preprocess, capsys, *argv):
    rc = preprocess.main([*argv, "--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def _bytes(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"])
def test_round_trip(kind, preprocess, capsys, tmp_path, corpus_texts, spm_model, hf_tokenizer_dir):
    flags = {"GPT2BPETokenizer": GPT2_FLAGS,
             "SentencePieceTokenizer": ["--tokenizer-type", kind, "--tokenizer-model", spm_model],
             "HuggingFaceTokenizer": ["--tokenizer-type", kind, "--tokenizer-model", hf_tokenizer_dir]}[kind]
    texts = corpus_texts[:20] + ["naïve café 😀  two  spaces\n\n\ttab"]
    rc, out, err = run_tool(preprocess, capsys, "--input", write_jsonl(tmp_path / "in.jsonl", texts),
                            "--output-prefix", str(tmp_path / "out"), "--append-eod", *flags)
    assert rc == 0, err
    assert f"wrote {tmp_path}/out_text_document.bin/.idx: {len(texts)} documents" in out
    tok = build_tokenizer_from_flags(kind, GPT2_VOCAB, GPT2_MERGES,
                                     spm_model if kind.startswith("Sentence") else hf_tokenizer_dir)
    docs, ds = read_documents(str(tmp_path / "out_text_document"))
    assert ds.index.dtype == numpy.uint16  # every vocabulary here has < 65500 ids
    assert len(docs) == len(texts)
    for ids, text in zip(docs, texts):
        assert ids == tok.tokenize(text) + [tok.eod]
        assert tok.detokenize(ids[:-1]) == text


def test_int32_when_vocabulary_is_large(preprocess, capsys, tmp_path):
    rc, out, _ = run_tool(preprocess, capsys, "--input", write_jsonl(tmp_path / "in.jsonl", ["70000 1 2", "3"]),
                          "--output-prefix", str(tmp_path / "big"), "--tokenizer-type", "NullTokenizer",
                          "--vocab-size", "70000", "--append-eod")
    assert rc == 0 and "(int32)" in out
    docs, ds = read_documents(str(tmp_path / "big_text_document"))
    assert ds.index.dtype == numpy.int32 and docs == [[70000, 1, 2, 70000], [3, 70000]]


def test_workers_and_partitions_give_identical_files(preprocess, capsys, tmp_path, corpus_texts):
    # 3 files of 70 short documents: several 64-line tasks per file, so the pools really interleave work.
    texts = [t[:600] for t in corpus_texts[:210]]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(3):
        write_jsonl(inputs / f"part{i}.jsonl", texts[70 * i:70 * (i + 1)])
    outputs = {}
    for workers, partitions in [(1, 1), (4, 1), (4, 3)]:
        prefix = str(tmp_path / f"w{workers}p{partitions}")
        rc, _, err = run_tool(preprocess, capsys, "--input", str(inputs), "--output-prefix", prefix, *GPT2_FLAGS,
                              "--append-eod", "--workers", str(workers), "--partitions", str(partitions))
        assert rc == 0, err
        outputs[(workers, partitions)] = _bytes(prefix + "_text_document")
    assert outputs[(1, 1)] == outputs[(4, 1)] == outputs[(4, 3)]
    docs, _ = read_documents(str(tmp_path / "w1p1_text_document"))
    assert len(docs) == 210
    assert not [f for f in os.listdir(tmp_path) if "incomplete" in f]


def test_compressed_and_multiple_keys(preprocess, capsys, tmp_path, corpus_texts):
    import json

    import zstandard

    texts = [t[:400] for t in corpus_texts[:30]]
    lines = "".join(json.dumps({"text": t, "title": t[:20]}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    results = {}
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst"):
        prefix = str(tmp_path / name.replace(".", "_"))
        rc, _, err = run_tool(preprocess, capsys, "--input", str(tmp_path / name), "--output-prefix", prefix,
                              "--json-keys", "text", "title", *GPT2_FLAGS)
        assert rc == 0, err
        results[name] = (_bytes(prefix + "_text_document"), _bytes(prefix + "_title_document"))
    assert results["a.jsonl"] == results["a.jsonl.gz"] == results["a.jsonl.zst"]
    tok = build_tokenizer_from_flags("GPT2BPETokenizer", GPT2_VOCAB, GPT2_MERGES)
    titles, _ = read_documents(str(tmp_path / "a_jsonl_title_document"))
    assert titles == [tok.tokenize(t[:20]) for t in texts]  # no --append-eod: no eod


def test_txt_inputs(preprocess, capsys, tmp_path):
    import zstandard

    tok = build_tokenizer_from_flags("GPT2BPETokenizer", GPT2_VOCAB, GPT2_MERGES)
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "b.txt").write_text("Second file.\nTwo lines.\n")
    (folder / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"First block.\n\n\nSecond block\nhere.\n"))
    rc, _, err = run_tool(preprocess, capsys, "--input", str(folder), "--output-prefix", str(tmp_path / "files"),
                          *GPT2_FLAGS)
    assert rc == 0, err
    docs, _ = read_documents(str(tmp_path / "files_text_document"))
    assert [tok.detokenize(d) for d in docs] == ["First block.\n\n\nSecond block\nhere.\n", "Second file.\nTwo lines.\n"]
    rc, _, err = run_tool(preprocess, capsys, "--input", str(folder), "--output-prefix", str(tmp_path / "blocks"),
                          "--txt-documents", "blank-line", *GPT2_FLAGS)
    assert rc == 0, err
    docs, _ = read_documents(str(tmp_path / "blocks_text_document"))
    assert [tok.detokenize(d) for d in docs] == ["First block.", "Second block\nhere.", "Second file.\nTwo lines."]


def test_bad_lines_are_skipped_and_counted(preprocess, capsys, tmp_path):
    lines = ['{"text": "good one"}', '{"text": broken', '{"other": "no text key"}', "[1, 2]", '{"text": 7}',
             '{"text": "   "}', "", '{"text": "good two"}']
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff utf8"}\n{"text": "good three"}\n')
    rc, out, err = run_tool(preprocess, capsys, "--input", str(path), "--output-prefix", str(tmp_path / "m"),
                            *GPT2_FLAGS)
    assert rc == 0, err
    assert ": 3 documents" in out
    assert "skipped 6 lines: 1 empty document, 1 invalid UTF-8, 1 malformed JSON, 1 no key 'text', " \
           "1 not a JSON object, 1 value is not a string" in out
    assert f"first: {path}:2 (malformed JSON), {path}:3 (no key 'text'), {path}:4 (not a JSON object)" in out
    tok = build_tokenizer_from_flags("GPT2BPETokenizer", GPT2_VOCAB, GPT2_MERGES)
    docs, _ = read_documents(str(tmp_path / "m_text_document"))
    assert [tok.detokenize(d) for d in docs] == ["good one", "good two", "good three"]


def test_truncated_gzip_keeps_earlier_documents(preprocess, capsys, tmp_path, corpus_texts):
    import json

    blob = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:40]).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    rc, out, err = run_tool(preprocess, capsys, "--input", str(tmp_path / "cut.jsonl.gz"),
                            "--output-prefix", str(tmp_path / "cut"), *GPT2_FLAGS)
    assert rc == 0
    assert "cut.jsonl.gz: input stream ends early" in err
    docs, _ = read_documents(str(tmp_path / "cut_text_document"))
    assert 0 < len(docs) < 40


def test_bad_inputs_give_one_line_errors(preprocess, capsys, tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", ["fine"])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "notes.csv").write_text("a,b\n")
    cases = [
        (["--input", str(tmp_path / "missing.jsonl")], f"--input {tmp_path}/missing.jsonl: no such file or directory"),
        (["--input", str(tmp_path / "empty.jsonl")], "no documents (0 lines skipped)"),
        (["--input", str(tmp_path / "emptydir")], "directory holds no .jsonl/.json/.txt(.gz/.zst) files"),
        (["--input", str(tmp_path / "*.parquet")], "pattern matches no files"),
        (["--input", str(tmp_path / "notes.csv")], "notes.csv: unsupported file type"),
        (["--input", good, "--output-prefix", str(tmp_path / "nodir" / "x")],
         f"directory {tmp_path}/nodir does not exist"),
        (["--input", good, "--workers", "0"], "--workers must be >= 1, got 0"),
        (["--input", good, "--vocab-file", str(tmp_path / "nope.json")], "--vocab-file"),
    ]
    for argv, message in cases:
        full = argv + (["--output-prefix", str(tmp_path / "o")] if "--output-prefix" not in argv else [])
        flags = [f for f in GPT2_FLAGS]
        if "--vocab-file" in argv:
            flags = ["--tokenizer-type", "GPT2BPETokenizer", "--merge-file", GPT2_MERGES]
        rc, out, err = run_tool(preprocess, capsys, *full, *flags)
        assert rc == 2, (argv, err)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (message, err)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".idx"))]


def test_failure_before_commit_keeps_previous_output(preprocess, capsys, tmp_path, monkeypatch):
    from megatron.core.datasets import indexed_dataset

    prefix = str(tmp_path / "keep")
    rc, _, _ = run_tool(preprocess, capsys, "--input", write_jsonl(tmp_path / "v1.jsonl", ["version one"]),
                        "--output-prefix", prefix, *GPT2_FLAGS)
    assert rc == 0
    before = _bytes(prefix + "_text_document")

    def interrupted(self, idx_path):
        raise KeyboardInterrupt

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "finalize", interrupted)
    rc, _, err = run_tool(preprocess, capsys, "--input", write_jsonl(tmp_path / "v2.jsonl", ["version two"] * 5),
                          "--output-prefix", prefix, *GPT2_FLAGS)
    assert rc == 130 and "interrupted" in err
    assert _bytes(prefix + "_text_document") == before
    assert sorted(os.listdir(tmp_path)) == ["keep_text_document.bin", "keep_text_document.idx", "v1.jsonl", "v2.jsonl"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_leaves_no_complete_looking_index(sig, tmp_path, corpus_texts):
    texts = corpus_texts * 2  # ~3M tokens: seconds of work after the first progress line
    path = write_jsonl(tmp_path / "big.jsonl", texts)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", path,
                             "--output-prefix", str(tmp_path / "big"), *GPT2_FLAGS, "--log-interval", "1",
                             "--workers", "2"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("processed"):
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    leftovers = os.listdir(tmp_path)
    assert not [f for f in leftovers if f.endswith(".idx")], leftovers
    assert "big_text_document.bin" not in leftovers
    if sig == signal.SIGTERM:
        assert "interrupted" in err and leftovers == ["big.jsonl"]
