"""Fixtures of the evaluation tests: a tiny NTP GPT-2-style and a tiny CoCoMix checkpoint (the tests/hf variants,
2 steps, trained in ONE launch), their exports, and a token dataset whose documents end with the EOD token,
some longer than the models' context (32)."""

from __future__ import annotations

import json
import os

import numpy
import pytest
import torch

from tests.helpers.launch import MULTI_RUN_WORKER, TINY_GPT, run_script
from tests.hf.conftest import VARIANTS

EOD = 255  # NullTokenizer of TINY_GPT: ids 0..254, EOD 255
CONTEXT = 32  # TINY_GPT's --seq-length
PADDED_EOD = 200  # gpt2_padded: ids 0..199, EOD 200, table padded to 256 rows


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{variant: checkpoint dir} for gpt2 (NTP -> GPT2LMHeadModel), cocomix (-> CoCoMix class), gpt2_padded
    (vocabulary 200 + EOD: 55 padding rows in the embedding table, which the export drops), cocomix_bf16
    (trained and exported in bf16) and llama (rotary, RMSNorm, SwiGLU, GQA -> LlamaForCausalLM)."""
    root = str(tmp_path_factory.mktemp("eval_ckpt"))
    runs, out = [], {}
    for variant in ("gpt2", "cocomix", "gpt2_padded", "cocomix_bf16", "llama"):
        out[variant] = os.path.join(root, variant)
        model = VARIANTS["gpt2"] + ["--vocab-size", str(PADDED_EOD)] if variant == "gpt2_padded" else VARIANTS[variant]
        runs.append([variant, "pretrain", TINY_GPT + model + [
            "--train-iters", "2", "--eval-interval", "100", "--save", out[variant], "--save-interval", "2"]])
    spec = os.path.join(root, "spec.json")
    with open(spec, "w") as f:
        json.dump(runs, f)
    run_script(MULTI_RUN_WORKER, [spec, os.path.join(root, "summary.json")], nproc=1, timeout=600)
    return out


def write_documents(prefix: str, num_docs: int = 24, seed: int = 0, min_len: int = 3, max_len: int = 90,
                    eod: int = EOD) -> list:
    """A megatron .bin/.idx of random documents (ids < eod) each ending with eod; returns them (int64)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    docs = []
    for _ in range(num_docs):
        doc = numpy.append(rng.integers(0, eod, int(rng.integers(min_len, max_len))), eod).astype(numpy.int64)
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs


@pytest.fixture(scope="session")
def token_data(tmp_path_factory):
    """(prefix, documents): 24 documents of 4 to 90 tokens."""
    prefix = os.path.join(str(tmp_path_factory.mktemp("eval_data")), "docs")
    return prefix, write_documents(prefix)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny forwards run on one thread: on 2 shared cores, torch's thread pool competing with other
    processes made them ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
