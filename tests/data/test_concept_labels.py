"""Concept labels file: round trip in both storage dtypes, shard merging, fingerprint checks and bad files."""


import numpy
import pytest
import torch

from megatron_cocomix.data.concept_labels import (
    ConceptLabelsDataset,
    ConceptLabelsWriter,
    read_fingerprint,
    write_fingerprint,
)

SEQ, NUM = 6, 4


def random_labels(n, num_latents, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_latents, (n, SEQ, NUM), generator=g)
    labels[torch.rand(n, SEQ, NUM, generator=g) < 0.3] = -1
    labels[:, -1] = -1
    return labels


def write(prefix, labels, num_latents, fingerprint=None):
    writer = ConceptLabelsWriter(prefix, SEQ, NUM, num_latents)
    writer.add(labels)
    writer.finalize()
    write_fingerprint(prefix, fingerprint or {"teacher_layer": 6}, SEQ, NUM, num_latents, len(labels))


@pytest.mark.parametrize("num_latents,dtype", [(32768, "uint16"), (65535, "uint16"), (70000, "int32")])
def test_round_trip(tmp_path, num_latents, dtype):
    prefix = str(tmp_path / "labels")
    labels = random_labels(5, num_latents)
    labels[0, 0, 0] = num_latents - 1
    write(prefix, labels, num_latents)
    ds = ConceptLabelsDataset(prefix)
    assert len(ds) == 5 and ds.fingerprint["dtype"] == dtype
    for i in range(5):
        item = ds[i]
        assert item.dtype == torch.long and item.shape == (SEQ, NUM)
        assert torch.equal(item, labels[i])
    raw = numpy.fromfile(prefix + ".bin", dtype=dtype)
    assert raw.size == 5 * SEQ * NUM
    if dtype == "uint16":
        assert (raw == 65535).sum() == (labels == -1).sum()
    with pytest.raises(IndexError):
        ds[5]


def test_shard_merge_keeps_order(tmp_path):
    labels = random_labels(7, 1000, seed=1)
    for name, part in (("a", labels[:3]), ("b", labels[3:])):
        writer = ConceptLabelsWriter(str(tmp_path / name), SEQ, NUM, 1000)
        writer.add(part)
        writer.finalize()
    merged = ConceptLabelsWriter(str(tmp_path / "all"), SEQ, NUM, 1000)
    merged.add_shard(str(tmp_path / "a"))
    merged.add_shard(str(tmp_path / "b"))
    merged.finalize()
    assert merged.num_samples == 7
    write_fingerprint(str(tmp_path / "all"), {}, SEQ, NUM, 1000, 7)
    ds = ConceptLabelsDataset(str(tmp_path / "all"))
    assert torch.equal(torch.stack([ds[i] for i in range(7)]), labels)


def test_fingerprint_mismatch_names_the_key(tmp_path):
    prefix = str(tmp_path / "labels")
    fp = {"data_path": ["/d/a"], "seq_length": SEQ, "teacher_layer": 6, "sae_sha256": "abc"}
    write(prefix, random_labels(2, 100), 100, fp)
    ds = ConceptLabelsDataset(prefix)
    ds.check_fingerprint(fp)
    ds.check_fingerprint({"data_path": ("/d/a",)})  # tuples and lists compare equal
    with pytest.raises(ValueError, match="'teacher_layer' is 6 but this run has 5"):
        ds.check_fingerprint(dict(fp, teacher_layer=5))
    with pytest.raises(ValueError, match="'sae_sha256' is 'abc' but this run has 'xyz'"):
        ds.check_fingerprint(dict(fp, sae_sha256="xyz"))
    with pytest.raises(ValueError, match="has no 'split'"):
        ds.check_fingerprint(dict(fp, split="969,30,1"))
    ds.check_fingerprint(dict(fp, teacher_layer=5), ignore={"teacher_layer"})


def test_bad_files(tmp_path):
    prefix = str(tmp_path / "labels")
    with pytest.raises(FileNotFoundError, match="no such file .*labels.bin"):
        ConceptLabelsDataset(prefix)
    writer = ConceptLabelsWriter(prefix, SEQ, NUM, 100)
    writer.add(random_labels(2, 100))
    writer.finalize()
    with pytest.raises(FileNotFoundError, match="no fingerprint"):
        ConceptLabelsDataset(prefix)
    write_fingerprint(prefix, {}, SEQ, NUM, 100, 3)
    with pytest.raises(ValueError, match="2 sequences but the fingerprint says 3"):
        ConceptLabelsDataset(prefix)
    with open(prefix + ".json", "w") as f:
        f.write("{")
    with pytest.raises(ValueError, match="invalid fingerprint"):
        read_fingerprint(prefix)
    with pytest.raises(ValueError, match="do not match"):
        ConceptLabelsWriter(str(tmp_path / "x"), SEQ, NUM, 100).add(torch.zeros(SEQ, NUM + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit uint16"):
        ConceptLabelsWriter(str(tmp_path / "y"), SEQ, NUM, 100).add(torch.full((SEQ, NUM), 65535))
