"""The training log: Megatron's stdout line (parsed the way Megatron log parsers read it), the validation block,
the start-up report, and the tensorboard scalars, from real training runs (pp2_run: tests/training/conftest.py);
plus the logger's averaging, skipped / nan counting and extra loss keys in-process."""

import math
import re

import pytest

from megatron_cocomix.arguments import parse_args
from megatron_cocomix.training import flops
from megatron_cocomix.training.logging import TrainingLogger
from tests.helpers.launch import TINY_GPT, run_pretrain
from tests.helpers.run_logs import tensorboard_scalars as scalars

LINE = re.compile(r"^ \[(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[.\d]*)\] iteration\s+(?P<iteration>\d+)/\s*(?P<total>\d+)"
                  r" \|(?P<fields>.*\|)$")
LOSS = re.compile(r"^\d\.\d{6}E[+-]\d\d$")
VALIDATION = re.compile(r"^ validation loss at iteration (\d+) on validation set \| (.*)$")
# Megatron's field order; tokens per second (and MFU on known GPUs) follow the throughput, memory goes last.
MEGATRON_FIELDS = ["consumed samples", "elapsed time per iteration (ms)", "throughput per GPU (TFLOP/s/GPU)",
                   "tokens per second", "learning rate", "global batch size", "lm loss", "loss scale", "grad norm",
                   "number of skipped iterations", "number of nan iterations", "max RSS (MB)"]


def parse_log(stdout: str, train_iters: int = 4) -> dict:
    """{iteration: {field: value string}} as a Megatron log parser builds it."""
    parsed = {}
    for line in stdout.splitlines():
        match = LINE.match(line)
        if match:
            fields = [f.strip() for f in match.group("fields").split("|") if f.strip()]
            parsed[int(match.group("iteration"))] = dict(f.rsplit(": ", 1) for f in fields)
            assert int(match.group("total")) == train_iters
    return parsed


def test_log_line_is_megatron_format(pp2_run):
    result, args, _, _ = pp2_run
    log = parse_log(result["stdout"])
    assert sorted(log) == [2, 4]  # --log-interval 2
    history = {entry["iteration"]: entry for entry in result["train_history"]}
    for iteration, fields in log.items():
        names = [name for name in fields if name in MEGATRON_FIELDS]
        assert names == MEGATRON_FIELDS, f"iteration {iteration}: fields {list(fields)}"
        assert int(fields["consumed samples"]) == iteration * args.global_batch_size
        assert int(fields["global batch size"]) == args.global_batch_size
        window = [history[i] for i in (iteration - 1, iteration)]
        # Losses: 7 significant digits, averaged over the iterations of the log interval.
        assert LOSS.match(fields["lm loss"])
        assert fields["lm loss"] == f"{sum(e['lm loss'] for e in window) / 2:.6E}"
        assert fields["learning rate"] == f"{history[iteration]['lr']:.6E}"
        assert fields["grad norm"] == f"{history[iteration]['grad_norm']:.3f}"
        elapsed = sum(e["time"] for e in window) / 2
        assert fields["elapsed time per iteration (ms)"] == f"{1000 * elapsed:.1f}"
        assert float(fields["tokens per second"]) == pytest.approx(args.global_batch_size * args.seq_length / elapsed,
                                                                    abs=1)
        assert fields["number of skipped iterations"].strip() == "0"
        assert fields["number of nan iterations"].strip() == "0"
        assert fields["loss scale"] == "1.0"
        assert float(fields["max RSS (MB)"]) > 50


def test_validation_block_and_startup_report(pp2_run):
    result, args, _, _ = pp2_run
    lines = result["stdout"].splitlines()
    blocks = [(i, VALIDATION.match(line)) for i, line in enumerate(lines) if VALIDATION.match(line)]
    # Every --eval-interval; the last iteration validated, so there is no separate end-of-training block.
    assert [int(m.group(1)) for _, m in blocks] == [2, 4]
    assert "validation loss at the end of training" not in result["stdout"]
    for i, match in blocks:
        assert lines[i - 1] == lines[i + 1] == "-" * (len(lines[i]) + 1)
        value, ppl = re.match(r"lm loss value: (\S+) \| lm loss PPL: (\S+) \| $", match.group(2)).groups()
        assert LOSS.match(value) and LOSS.match(ppl)
        assert float(ppl) == pytest.approx(math.exp(float(value)), rel=1e-6)
    assert float(value) == pytest.approx(result["valid"]["lm loss"], rel=1e-6)

    stages = re.findall(r"parameters on pipeline stage (\d): (\d+), per tensor-parallel rank: (\d+) "
                        r"\(built model: (\d+)\)", result["stdout"])
    assert [s[0] for s in stages] == ["0", "1"]
    for _, _, estimated, built in stages:
        assert estimated == built  # the analytic count equals the megatron-core model's
    model_flops = flops.num_floating_point_operations(args)
    assert f"FLOPs per iteration: {model_flops:.4e} model" in result["stdout"]
    assert "memory estimate per device, stage 1 (MB)" in result["stdout"]
    for rank in (0, 1):  # Megatron's per-rank memory line, once, from each pipeline stage
        # Not anchored to line starts: the two processes share one pipe, so lines of different ranks can meet.
        assert len(re.findall(rf"\[Rank {rank}\] \(after 2 iterations\) memory \(MB\) \| max RSS: [\d.]+",
                              result["stdout"])) == 1


def test_tensorboard_scalars(pp2_run):
    result, args, tensorboard_dir, _ = pp2_run
    values = scalars(tensorboard_dir)
    expected = {"lm loss", "learning-rate", "grad-norm", "loss-scale", "batch-size", "iteration-time", "throughput",
                "tflops-per-device", "tokens-per-sec", "mem-max-rss-bytes", "lm loss validation",
                "lm loss validation ppl", "lm loss vs samples", "learning-rate vs samples"}
    assert expected <= set(values), f"missing {expected - set(values)}"
    history = result["train_history"]
    assert [values["lm loss"][e["iteration"]] for e in history] == pytest.approx([e["lm loss"] for e in history],
                                                                                rel=1e-6)
    assert [values["learning-rate"][e["iteration"]] for e in history] == pytest.approx([e["lr"] for e in history])
    assert values["lm loss validation ppl"][4] == pytest.approx(math.exp(values["lm loss validation"][4]), rel=1e-5)
    assert values["lm loss validation"][4] == pytest.approx(result["valid"]["lm loss"], rel=1e-6)
    # Tokens seen by iteration (tools/plot_runs.py's x axis): 8 sequences x 32 tokens per iteration.
    assert values["tokens"] == {i: i * 8 * 32 for i in (1, 2, 3, 4)}
    for step in (2, 4):
        seconds = values["iteration-time"][step]
        # TFLOP/s per device = FLOPs per iteration / (time x world size); tokens/s counts the global batch.
        assert values["throughput"][step] * seconds * 2 * 1e12 == pytest.approx(
            flops.num_floating_point_operations(args), rel=1e-5)
        assert values["tflops-per-device"][step] == values["throughput"][step]
        assert values["tokens-per-sec"][step] * seconds == pytest.approx(args.global_batch_size * args.seq_length,
                                                                         rel=1e-5)


def test_tensor_parallel_parameter_count_and_layout(tmp_path):
    """A llama-style model at TP2: per-rank parameters from the estimate equal the built model's."""
    flags = TINY_GPT + ["--tensor-model-parallel-size", "2", "--normalization", "RMSNorm", "--disable-bias-linear",
                        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
                        "--train-iters", "2", "--eval-iters", "0"]
    result = run_pretrain(flags, tmp_path, nproc=2)
    stages = re.findall(r"parameters on pipeline stage 0: (\d+), per tensor-parallel rank: (\d+) "
                        r"\(built model: (\d+)\)", result["stdout"])
    assert len(stages) == 1 and stages[0][1] == stages[0][2]
    assert int(stages[0][0]) > int(stages[0][1])
    log = parse_log(result["stdout"], train_iters=2)
    assert sorted(log) == [1, 2]


# ---------------------------------------------------------------------------------------------------------
# In-process: averaging, skipped / nan iterations, extra loss keys, MFU
# ---------------------------------------------------------------------------------------------------------

def test_extra_loss_keys_skipped_and_nan_iterations(tmp_path, capsys):
    args = parse_args(TINY_GPT + ["--log-interval", "2", "--tensorboard-dir", str(tmp_path)], world_size=1)
    args.padded_vocab_size = 256
    args.peak_tflops = 1e-3  # stands in for a device of the peak table, so that MFU is printed
    logger = TrainingLogger(args)
    steps = [
        ({"lm loss": 2.0, "concept loss": 5.0, "concept top1 acc": 0.25}, False),
        ({"lm loss": 4.0, "concept loss": 7.0, "concept top1 acc": 0.75}, False),
        ({"lm loss": float("nan"), "concept loss": 1.0, "concept top1 acc": 0.0}, True),
        ({"lm loss": 3.5, "concept loss": 6.5, "concept top1 acc": 0.5}, False),
    ]
    for iteration, (losses, skipped) in enumerate(steps, start=1):
        logger.training_log(iteration, losses, 1e-3, 1.5, None, skipped=skipped, iteration_time=0.5,
                            consumed_samples=8 * iteration)
    logger.close()
    log = parse_log(capsys.readouterr().out)
    assert log[2]["lm loss"] == "3.000000E+00"
    assert log[2]["concept loss"] == "6.000000E+00"
    assert log[2]["concept top1 acc"] == "5.000000E-01"
    # The skipped / nan iteration is counted and left out of the averages.
    assert log[4]["lm loss"] == "3.500000E+00" and log[4]["concept top1 acc"] == "5.000000E-01"
    assert log[4]["number of skipped iterations"].strip() == "1"
    assert log[4]["number of nan iterations"].strip() == "1"
    assert list(log[4]).index("concept loss") == list(log[4]).index("lm loss") + 1
    tflops = flops.num_floating_point_operations(args) / (0.5 * 1e12)
    assert float(log[4]["MFU (%)"]) == pytest.approx(100 * tflops / 1e-3, abs=0.05)
    values = scalars(str(tmp_path))
    assert values["concept loss"] == {1: 5.0, 2: 7.0, 3: 1.0, 4: 6.5}
    assert values["concept top1 acc"][2] == 0.75
    assert values["mfu"][4] == pytest.approx(100 * tflops / 1e-3, rel=1e-5)


def test_unknown_concept_count_is_reported_not_guessed(capsys):
    args = parse_args(TINY_GPT, world_size=1)
    args.padded_vocab_size = 256
    args.cocomix, args.concept_layer, args.concept_dim, args.concept_labels = True, 1, None, "labels/prefix"
    logger = TrainingLogger(args)
    logger.log_startup()
    logger.training_log(1, {"lm loss": 5.0}, 1e-3, 1.0, None, skipped=False, iteration_time=0.1, consumed_samples=8)
    out = capsys.readouterr().out
    assert "FLOPs not estimated: FLOPs estimate: --cocomix needs the number of concepts (--concept-dim" in out
    fields = parse_log(out)[1]
    assert "throughput per GPU (TFLOP/s/GPU)" not in fields and fields["tokens per second"] == "2560"  # 8 x 32 tokens in 0.1 s
