"""Fixtures for the data tests: the shipped corpus, tools/preprocess_data.py in-process, trained tokenizers, a
single-rank gloo group."""

import gzip
import json
import warnings

import pytest

from tests.helpers.data_files import write_jsonl
from tests.helpers.launch import free_port
from tests.helpers.paths import CORPUS, GPT2_MERGES, GPT2_VOCAB

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(scope="session")
def preprocess():
    from tools import preprocess_data

    return preprocess_data


@pytest.fixture(scope="session")
def corpus_texts():
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, corpus_texts):
    """A 600-piece SentencePiece model trained by tools/train_tokenizer.py on a slice of the corpus."""
    from tools import train_tokenizer

    tmp = tmp_path_factory.mktemp("spm")
    corpus = write_jsonl(tmp / "slice.jsonl", corpus_texts[:60])
    rc = train_tokenizer.main(["--input", corpus, "--model-prefix", str(tmp / "spm"),
                               "--vocab-size", "600", "--num-threads", "2"])
    assert rc == 0
    return str(tmp / "spm.model")


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    """A Hugging Face tokenizer.json (and directory) built with `tokenizers` from the shipped GPT-2 files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tmp = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE.from_file(GPT2_VOCAB, GPT2_MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp / "tokenizer.json"))
    return str(tmp)


@pytest.fixture(scope="module")
def single_rank_group():
    """torch.distributed (gloo, world 1) + megatron parallel_state at TP1/PP1, as megatron-core's dataset builder
    expects; torn down after the module."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if created:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
