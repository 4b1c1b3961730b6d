"""Training datasets on megatron-core: splits, 0.7/0.3 blending, sample layout, validation of .bin/.idx pairs,
the pretraining loader (resume, data parallel, worker count)."""

import argparse
import os
import shutil

import numpy
import pytest
import torch

from megatron_cocomix.data.datasets import (
    build_pretraining_data_loader,
    build_train_valid_test_datasets,
    validate_indexed_dataset,
)
from megatron_cocomix.data.tokenizer import build_tokenizer_from_flags
from tests.helpers.data_files import write_jsonl

pytestmark = pytest.mark.usefixtures("single_rank_group")

VOCAB = 200  # NullTokenizer: ids 0..199, eod 200
EOD = VOCAB


def null_tokenizer():
    return build_tokenizer_from_flags("NullTokenizer", vocab_size=VOCAB)


def data_args(tmp_path, **overrides):
    args = dict(seed=1234, seq_length=32, data_path=None, train_data_path=None, valid_data_path=None,
                test_data_path=None, split=None, data_cache_path=str(tmp_path / "cache") if tmp_path else None, mock_data=False,
                reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    args.update(overrides)
    return argparse.Namespace(**args)


def make_dataset(preprocess, tmp_path, name, documents):
    """Preprocess NullTokenizer documents (lists of ids) into {tmp}/{name}_text_document with --append-eod."""
    texts = [" ".join(str(i) for i in doc) for doc in documents]
    rc = preprocess.main(["--input", write_jsonl(tmp_path / f"{name}.jsonl", texts), "--output-prefix",
                          str(tmp_path / name), "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
                          "--append-eod", "--quiet"])
    assert rc == 0
    return str(tmp_path / f"{name}_text_document")


def content(sample):
    """The non-eod token ids of a sample (tokens and the last label)."""
    ids = torch.cat([sample["tokens"], sample["labels"][-1:]])
    return set(ids[ids != EOD].tolist())


@pytest.fixture(scope="module")
def labelled(preprocess, tmp_path_factory):
    """100 documents; document i is the id i repeated 5..20 times, so every token names its document."""
    tmp = tmp_path_factory.mktemp("labelled")
    rng = numpy.random.default_rng(0)
    return make_dataset(preprocess, tmp, "labelled", [[i] * int(rng.integers(5, 21)) for i in range(100)]), tmp


def test_split_sizes_follow_megatron_rounding(labelled):
    prefix, tmp = labelled
    train, valid, test = build_train_valid_test_datasets(
        data_args(tmp, data_path=[prefix], split="80,15,5"), null_tokenizer(), [300, 40, 20])
    # megatron-core cuts documents at round(fraction x 100): [0, 80), [80, 95), [95, 100).
    for dataset, (lo, hi), wanted in [(train, (0, 80), 300), (valid, (80, 95), 40), (test, (95, 100), 20)]:
        assert dataset.indices.tolist() == list(range(lo, hi))
        assert len(dataset) >= wanted
        seen = set().union(*(content(dataset[i]) for i in range(len(dataset))))
        assert seen == set(range(lo, hi))  # every document of the split appears, none of another split


def test_sample_layout_and_eod_options(labelled):
    prefix, tmp = labelled
    args = data_args(tmp, data_path=[prefix], split="100,0,0")
    train, valid, test = build_train_valid_test_datasets(args, null_tokenizer(), [50, 0, 0])
    assert valid is None and test is None
    sample = train[3]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert sample["tokens"].shape == (32,) and sample["tokens"].dtype == torch.int64
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    assert torch.equal(sample["position_ids"], torch.arange(32)) and torch.all(sample["loss_mask"] == 1)

    args = data_args(tmp, data_path=[prefix], split="100,0,0", reset_position_ids=True, reset_attention_mask=True,
                     eod_mask_loss=True, data_cache_path=str(tmp / "cache2"))
    train, _, _ = build_train_valid_test_datasets(args, null_tokenizer(), [50, 0, 0])
    for i in range(10):
        s = train[i]
        tokens = s["tokens"]
        eods = (tokens == EOD).nonzero().flatten().tolist()
        assert eods, "each 32-token sample crosses a document end (documents have <= 20 tokens)"
        assert torch.equal(s["loss_mask"], (tokens != EOD).float())
        # positions restart after each eod; attention never crosses an eod (True = masked)
        start = eods[0] + 1
        assert s["position_ids"][start].item() == 0
        assert s["attention_mask"].shape == (1, 32, 32)
        assert s["attention_mask"][0, start, start - 1].item() and not s["attention_mask"][0, start, start].item()


def test_blend_weights_give_proportions(preprocess, tmp_path):
    rng = numpy.random.default_rng(1)
    low = make_dataset(preprocess, tmp_path, "low", [rng.integers(0, 100, rng.integers(5, 40)).tolist()
                                                     for _ in range(150)])
    high = make_dataset(preprocess, tmp_path, "high", [rng.integers(100, 200, rng.integers(5, 40)).tolist()
                                                       for _ in range(150)])
    args = data_args(tmp_path, data_path=["0.7", low, "0.3", high], split="98,1,1")
    train, _, _ = build_train_valid_test_datasets(args, null_tokenizer(), [2000, 10, 10])
    sources = []
    for i in range(2000):
        ids = content(train[i])
        assert ids and (max(ids) < 100 or min(ids) >= 100), "a sample mixes two datasets"
        sources.append(max(ids) < 100)
    assert abs(numpy.mean(sources) - 0.7) < 0.01
    assert abs(numpy.mean(sources[:200]) - 0.7) < 0.02  # the blend holds early on, not only on average


def test_mock_data():
    args = data_args(None, mock_data=True, data_cache_path=None)
    train, valid, test = build_train_valid_test_datasets(args, null_tokenizer(), [20, 4, 4])
    assert len(train) >= 20 and train[0]["tokens"].shape == (32,)
    assert int(train[0]["tokens"].max()) <= EOD


def _copy(prefix, tmp_path, name):
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, str(tmp_path / name) + suffix)
    return str(tmp_path / name)


def test_bad_datasets_are_refused_before_training(labelled, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix, _ = labelled
    good_tokens = numpy.fromfile(prefix + ".bin", dtype=numpy.uint16)

    truncated = _copy(prefix, tmp_path, "truncated")
    os.truncate(truncated + ".bin", os.path.getsize(truncated + ".bin") - 10)
    wrong_dtype = _copy(prefix, tmp_path, "wrong_dtype")
    good_tokens.astype(numpy.int32).tofile(wrong_dtype + ".bin")
    short_idx = _copy(prefix, tmp_path, "short_idx")
    os.truncate(short_idx + ".idx", os.path.getsize(short_idx + ".idx") - 8)
    empty = str(tmp_path / "empty")
    builder = IndexedDatasetBuilder(empty + ".bin", dtype=numpy.uint16)
    builder.add_document(numpy.array([], dtype=numpy.uint16), [0])
    builder.finalize(empty + ".idx")
    not_index = _copy(prefix, tmp_path, "not_index")
    with open(not_index + ".idx", "r+b") as f:
        f.write(b"GARBAGE!!")

    cases = [
        (str(tmp_path / "missing"), FileNotFoundError, f"{tmp_path}/missing.idx does not exist"),
        (truncated, ValueError, f"{truncated}.bin: .* bytes, but .* describes .* uint16 tokens .*: truncated"),
        (wrong_dtype, ValueError, "longer than its index, or written with another dtype"),
        (short_idx, ValueError, f"{short_idx}.idx: .* truncated or corrupt"),
        (empty, ValueError, "has 0 tokens"),
        (not_index, ValueError, "not a megatron IndexedDataset index"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            build_train_valid_test_datasets(data_args(tmp_path, data_path=["0.5", prefix, "0.5", bad], split="1,0,0"),
                                            null_tokenizer(), [10, 0, 0])
    with pytest.raises(ValueError, match=r"token id 200 is outside the tokenizer's vocabulary \[0, 51\)"):
        build_train_valid_test_datasets(data_args(tmp_path, train_data_path=[prefix]),
                                        build_tokenizer_from_flags("NullTokenizer", vocab_size=50), [10, None, None])
    with pytest.raises(ValueError, match="uint16 cannot hold the tokenizer's 70001 ids"):
        validate_indexed_dataset(prefix, vocab_size=70001)
    summary = validate_indexed_dataset(prefix, vocab_size=VOCAB + 1)
    assert summary.num_documents == 100 and summary.num_tokens == good_tokens.size


def test_split_with_no_tokens_is_refused(preprocess, tmp_path):
    tiny = make_dataset(preprocess, tmp_path, "tiny", [[1, 2], [3], [4, 5]])
    with pytest.raises(ValueError, match=r"--split 969,30,1: the valid part of .*tiny_text_document \(3 documents\) "
                                         r"gets 0 tokens"):
        build_train_valid_test_datasets(data_args(tmp_path, data_path=[tiny]), null_tokenizer(), [10, 5, 5])


def _batches(loader, n):
    out = []
    for batch in loader:
        out.append(batch["tokens"])
        if len(out) == n:
            break
    return out


def test_loader_resume_data_parallel_and_workers(labelled):
    prefix, tmp = labelled
    train, _, _ = build_train_valid_test_datasets(data_args(tmp, data_path=[prefix], split="100,0,0"),
                                                  null_tokenizer(), [64, 0, 0])
    full = _batches(build_pretraining_data_loader(train, 0, 2, 0, 1, num_workers=0), 6)
    assert all(b.shape == (2, 32) for b in full)
    for k in range(2):  # the global order is the dataset's order
        assert torch.equal(full[0][k], train[k]["tokens"])
    resumed = _batches(build_pretraining_data_loader(train, 6, 2, 0, 1, num_workers=0), 3)
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:6]))
    with_workers = _batches(build_pretraining_data_loader(train, 0, 2, 0, 1, num_workers=2), 6)
    assert all(torch.equal(a, b) for a, b in zip(with_workers, full))
    # DP 2: each global micro-batch of 4 consecutive samples is split rank 0 | rank 1; resuming at 8 samples
    # continues with samples 8..11.
    for rank in (0, 1):
        batches = _batches(build_pretraining_data_loader(train, 8, 2, rank, 2, num_workers=0), 2)
        for step, batch in enumerate(batches):
            first = 8 + 4 * step + 2 * rank
            assert torch.equal(batch, torch.stack([train[first]["tokens"], train[first + 1]["tokens"]]))
    assert build_pretraining_data_loader(None, 0, 2, 0, 1, 0) is None
    with pytest.raises(ValueError, match="consumed_samples 100000 is outside the dataset"):
        build_pretraining_data_loader(train, 100000, 2, 0, 1, 0)
