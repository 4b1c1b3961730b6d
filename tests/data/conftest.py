"""Fixtures for the data tests: the shipped corpus, the tools imported in-process, a single-rank gloo group."""

import gzip
import importlib.util
import json
import os
import socket
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "examples", "data", "shakespeare.jsonl.gz")
GPT2_VOCAB = os.path.join(ROOT, "examples", "data", "gpt2", "encoder.json")
GPT2_MERGES = os.path.join(ROOT, "examples", "data", "gpt2", "vocab.bpe")
GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", GPT2_VOCAB, "--merge-file", GPT2_MERGES]

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling (worker pools) look the module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def preprocess():
    return load_tool("preprocess_data")


@pytest.fixture(scope="session")
def corpus_texts():
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, corpus_texts):
    """A 600-piece SentencePiece model trained by tools/train_tokenizer.py on a slice of the corpus."""
    tmp = tmp_path_factory.mktemp("spm")
    corpus = write_jsonl(tmp / "slice.jsonl", corpus_texts[:60])
    rc = load_tool("train_tokenizer").main(["--input", corpus, "--model-prefix", str(tmp / "spm"),
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_rank_group():
    """torch.distributed (gloo, world 1) + megatron parallel_state at TP1/PP1, as megatron-core's dataset builder
    expects; torn down after the module."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if created:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
