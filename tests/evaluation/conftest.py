"""Fixtures of the evaluation tests: a tiny NTP GPT-2-style and a tiny CoCoMix checkpoint (the tests/hf variants,
2 steps, trained in ONE launch), their exports, a token dataset whose documents end with the EOD token, some
longer than the models' context (32), zero-shot task files, and a guard that fails any connection off this
machine."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers.evaluation_data import PADDED_EOD, write_documents
from tests.helpers.hf_checkpoints import VARIANTS, export
from tests.helpers.launch import MULTI_RUN_WORKER, TINY_GPT, run_script


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


@pytest.fixture(scope="module")
def exports(tiny_checkpoints, tmp_path_factory, single_process):
    """{variant: HF export dir} of tiny_checkpoints (each exported once per session)."""
    root = str(tmp_path_factory.mktemp("eval_exports"))
    return {variant: export(path, root, ("eval", variant))[0] for variant, path in tiny_checkpoints.items()}


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


@pytest.fixture
def no_network(monkeypatch):
    """Records (and refuses) every connection and name lookup beyond the loopback; yields the list of attempts,
    which a test asserts empty: libraries may swallow the refusal."""
    import socket

    local = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
    attempts = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if isinstance(address, tuple) and address[0] not in local:
            attempts.append(address)
            raise OSError(f"test guard: no network ({address})")
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in local and host is not None:
            attempts.append(host)
            raise OSError(f"test guard: no network ({host})")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield attempts
