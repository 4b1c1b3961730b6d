"""Runs shared by the tests that need the card (`python -m pytest tests -m gpu`; each module here is marked gpu, and
tests/conftest.py skips them without a CUDA device), each paid for once per session.

- `fp32_runs`: the tiny CoCoMix (online labels) trained 5 iterations in fp32 on CUDA and, at the same time, on
  the CPU (CUDA_VISIBLE_DEVICES empty): the CPU reference of the same session. The CUDA run saves its checkpoint
  for the tools' tests.
- `bf16_runs`: tools/extract_concepts.py on CUDA (and on the CPU at the same time, for comparison), then one
  launch that trains the tiny student in bf16 as
  CoCoMix under DeepSpeed ZeRO-1, NTP, NTP with megatron's distributed optimizer, CoCoMix with online and with
  the extracted labels, and KD (tests/helpers/multi_run_worker.py: one start-up for six runs).
- `export`: tools/convert_to_hf.py on the fp32 checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers.gpu_runs import (
    BF16_ITERS,
    FP32_ITERS,
    TINY_TEACHER,
    make_teacher,
    quickstart_data,
    teacher_flags,
    tiny_cocomix,
    tiny_student,
)
from tests.helpers.launch import MULTI_RUN_WORKER, run_pretrain, run_script
from tests.helpers.paths import ROOT

TOOLS = os.path.join(ROOT, "tools")


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> str:
    return quickstart_data(str(tmp_path_factory.mktemp("data_cache")))


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> str:
    return make_teacher(str(tmp_path_factory.mktemp("tiny_assets")), TINY_TEACHER)


@pytest.fixture(scope="session")
def fp32_runs(quickstart, tiny_assets, tmp_path_factory) -> dict:
    """{"cuda": summary, "cpu": summary, "checkpoint": the CUDA run's --save}; the teacher pinned to fp32, TF32
    off on the device (NVIDIA_TF32_OVERRIDE=0 reaches cuBLAS whatever torch's flags say)."""
    tmp = tmp_path_factory.mktemp("fp32")
    flags = tiny_student(quickstart, FP32_ITERS) + tiny_cocomix(tiny_assets) + ["--teacher-dtype", "fp32"]
    checkpoint = str(tmp / "checkpoint")
    with ThreadPoolExecutor(2) as pool:
        cuda = pool.submit(run_pretrain, flags + ["--save", checkpoint], tmp, name="cuda",
                           env={"NVIDIA_TF32_OVERRIDE": "0"})
        cpu = pool.submit(run_pretrain, flags, tmp, name="cpu", env={"CUDA_VISIBLE_DEVICES": ""})
        return {"cuda": cuda.result(), "cpu": cpu.result(), "checkpoint": checkpoint}


@pytest.fixture(scope="session")
def bf16_runs(quickstart, tiny_assets, tmp_path_factory) -> dict:
    """{run name: summary} of the bf16 launch, and "labels" / "cpu_labels": the prefixes of the labels extracted on
    CUDA (which the precomputed run trains on) and on the CPU."""
    tmp = tmp_path_factory.mktemp("bf16")
    student = tiny_student(quickstart, BF16_ITERS, bf16=True)
    labels, cpu_labels = str(tmp / "labels"), str(tmp / "cpu_labels")
    # The teacher pinned to fp32 (whatever the default precision) for the comparison with the CPU.
    fp32_teacher = teacher_flags(tiny_assets) + ["--teacher-dtype", "fp32"]
    extract = student + fp32_teacher + ["--no-progress", "--output-prefix"]
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(run_script, os.path.join(TOOLS, "extract_concepts.py"), extract + [labels],
                            env={"NVIDIA_TF32_OVERRIDE": "0"}),
                pool.submit(run_script, os.path.join(TOOLS, "extract_concepts.py"), extract + [cpu_labels],
                            env={"CUDA_VISIBLE_DEVICES": ""})]
        for future in done:
            future.result()
    zero1 = str(tmp / "zero1.json")
    with open(zero1, "w") as f:
        json.dump({"zero_optimization": {"stage": 1}}, f)
    online = tiny_cocomix(tiny_assets)
    runs = [  # DeepSpeed first: it sets up the launch's process group (deepspeed.init_distributed), as it would alone
        ["cocomix_zero1", "pretrain", student + online + ["--deepspeed", "--deepspeed_config", zero1]],
        ["ntp", "pretrain", student],
        ["ntp_distopt", "pretrain", student + ["--use-distributed-optimizer"]],
        ["cocomix_online", "pretrain", student + online],
        # With the teacher's flags, training checks the labels' fingerprint against them.
        ["cocomix_precomputed", "pretrain", student + tiny_cocomix(labels=labels) + fp32_teacher],
        ["kd", "pretrain", student + ["--kd", "--teacher-model", os.path.join(tiny_assets, "teacher"),
                                      "--teacher-layer", "2"]],
    ]
    spec, summaries = str(tmp / "spec.json"), str(tmp / "summaries.json")
    with open(spec, "w") as f:
        json.dump(runs, f)
    run_script(MULTI_RUN_WORKER, [spec, summaries], timeout=600)
    with open(summaries) as f:
        result = json.load(f)
    result.update(labels=labels, cpu_labels=cpu_labels)
    return result


VERIFY = re.compile(r"verify: max abs logit diff (\S+), mean KL (\S+)")


@pytest.fixture(scope="session")
def export(fp32_runs, tmp_path_factory) -> dict:
    """{"path": the Hugging Face export of the fp32 checkpoint, "verify": (max |logit diff|, mean KL) the tool
    printed}."""
    path = str(tmp_path_factory.mktemp("export") / "hf")
    proc = run_script(os.path.join(TOOLS, "convert_to_hf.py"), ["--load", fp32_runs["checkpoint"], "--output", path])
    numbers = VERIFY.search(proc.stdout)
    assert numbers, proc.stdout[-3000:]
    return {"path": path, "verify": (float(numbers.group(1)), float(numbers.group(2)))}
