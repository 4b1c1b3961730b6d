"""The launch scripts in examples/ stay in step with the trainer: syntax, flags, configs and their arithmetic.

- Every script passes `bash -n`.
- Every `--flag` written in a script or args file (code and comments) is an option of the program that takes it:
  pretrain_cocomix.py (megatron_cocomix.arguments.build_parser), tools/extract_concepts.py, tools/preprocess_data.py,
  tools/make_tiny_teacher.py, torchrun, the deepspeed launcher, or Slurm's sbatch/srun.
- Each launch script run with DRY_RUN=1 prints its command; the launcher part parses with the launcher's own
  parser and the training part parses and validates with `parse_args(world_size=...)` (the DeepSpeed runs also
  pass the trainer's ds_config check).
- The paper configs match docs/design.md §7 (written out below as the reference): sizes, concept layer,
  LR, batch tokens, 20B tokens, warmup 1/300, cosine to 10%, AdamW settings; and their parameter counts land on
  69M / 386M / 1.38B with the NTP baselines parameter-matched.
- The quickstart data is prepared idempotently and the quickstart args validate.
No training runs here.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import subprocess

import pytest

from megatron_cocomix.arguments import build_parser, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = sorted(
    p for p in glob.glob(os.path.join(EXAMPLES, "**", "*"), recursive=True)
    if p.endswith((".sh", ".sbatch")) and not p.startswith(os.path.join(EXAMPLES, "data") + os.sep))
ARGS_FILES = [os.path.join(EXAMPLES, "quickstart_args.txt")]
PAPER_SCRIPTS = ["pretrain_cocomix_69m", "pretrain_cocomix_386m", "pretrain_cocomix_1.38b",
                 "pretrain_ntp_69m", "pretrain_ntp_386m", "pretrain_ntp_1.38b"]

# docs/design.md §7, written out: (CoCoMix width, layers, heads, NTP width, concept layer, peak LR,
# tokens per batch, nominal parameters).
PAPER = {
    "69m": dict(d=512, layers=8, heads=8, ntp_d=624, concept_layer=3, lr=6e-4, batch_tokens=512 * 1024,
                params=69e6),
    "386m": dict(d=1024, layers=24, heads=16, ntp_d=1072, concept_layer=5, lr=3e-4, batch_tokens=512 * 1024,
                 params=386e6),
    "1.38b": dict(d=2048, layers=24, heads=16, ntp_d=2096, concept_layer=5, lr=2e-4, batch_tokens=1024 * 1024,
                  params=1.38e9),
}
GPT2_VOCAB = 50257
NUM_CONCEPTS = 32768  # the OpenAI GPT-2 SAE's latents
TRAIN_TOKENS = 20e9
SLURM_OPTIONS = {"--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--exclusive",
                 "--time", "--output", "--kill-on-bad-exit", "--export"}


# ----------------------------------------------------------------------------------------------- option sets
def _options(parser: argparse.ArgumentParser) -> set:
    return {opt for action in parser._actions for opt in action.option_strings}


def _load_tool(name: str):
    """tools/NAME.py as a module (tools/ is no package)."""
    import importlib.util
    import sys

    module_name = f"_tools_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, "tools", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def _tool_parser(name: str, attr: str = "build_parser") -> argparse.ArgumentParser:
    return getattr(_load_tool(name), attr)()


def _preprocess_parser() -> argparse.ArgumentParser:
    """tools/preprocess_data.py builds its parser inside a function; take it from there."""
    source = open(os.path.join(ROOT, "tools", "preprocess_data.py")).read()
    name = re.search(r"^def (\w+)\([^)]*\)\s*->\s*argparse\.ArgumentParser", source, re.M)
    assert name, "tools/preprocess_data.py: no function returning its ArgumentParser"
    return _tool_parser("preprocess_data", name.group(1))


def _deepspeed_launcher_options() -> set:
    """The options of DeepSpeed's launcher (deepspeed.launcher.runner builds its parser inside parse_args)."""
    import deepspeed.launcher.runner as runner

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        return original(self, args, namespace)

    argparse.ArgumentParser.parse_args = capture
    try:
        runner.parse_args(["script.py"])
    finally:
        argparse.ArgumentParser.parse_args = original
    return _options(captured["parser"])


@pytest.fixture(scope="module")
def known_options() -> dict:
    from torch.distributed.run import get_args_parser

    return {
        "train": _options(build_parser()),
        "extract": _options(_tool_parser("extract_concepts")),
        "preprocess": _options(_preprocess_parser()),
        "tiny_teacher": _options(_tool_parser("make_tiny_teacher")),
        "torchrun": _options(get_args_parser()),
        "deepspeed": _deepspeed_launcher_options(),
        "slurm": SLURM_OPTIONS,
    }


def _consumers(path: str) -> tuple:
    """Which programs a file's flags may belong to."""
    name = os.path.relpath(path, EXAMPLES)
    if name == "prepare_quickstart_data.sh":
        return ("preprocess", "train")  # its comments name the training flag that reads the output
    if name == "tiny_cocomix_cpu.sh":
        return ("train", "tiny_teacher")
    if name == "quickstart_args.txt":
        return ("train",)
    if name.startswith("multinode"):
        return ("train", "torchrun", "deepspeed", "slurm")
    return ("train", "extract", "torchrun", "deepspeed")


# Environment variables the scripts read: the tests set them explicitly.
SCRIPT_SETTINGS = {"DATA_PATH", "TEACHER", "SAE", "CHECKPOINT_DIR", "CONCEPT_LABELS", "EXTRACT_LABELS", "LAUNCHER",
                   "GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_BACKEND", "RDZV_ID",
                   "HOSTFILE", "ZERO_STAGE", "MODE", "SIZE", "TP", "PP", "MICRO_BATCH_SIZE", "TRAIN_TOKENS",
                   "HIDDEN_SIZE", "CONFIG", "REPO_DIR", "RUN_DIR", "DRY_RUN", "VOCAB_FILE", "MERGE_FILE",
                   "OUTPUT_DIR", "FORCE"}

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


# ---------------------------------------------------------------------------------------------- static checks
def test_examples_exist():
    names = {os.path.relpath(p, EXAMPLES) for p in SCRIPTS}
    for required in [f"{s}.sh" for s in PAPER_SCRIPTS] + [
            "pretrain_baselines.sh", "tiny_cocomix_cpu.sh", "prepare_quickstart_data.sh",
            "multinode/launch_deepspeed.sh", "multinode/launch_torchrun.sh", "multinode/slurm_cocomix.sbatch"]:
        assert required in names, f"examples/{required} is missing"
    assert os.path.isfile(os.path.join(EXAMPLES, "multinode", "hostfile.example"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: os.path.relpath(p, EXAMPLES))
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, f"{script}: {result.stderr}"


@pytest.mark.parametrize("path", SCRIPTS + ARGS_FILES, ids=lambda p: os.path.relpath(p, EXAMPLES))
def test_every_flag_is_known(path, known_options):
    allowed = set().union(*(known_options[c] for c in _consumers(path)))
    text = open(path).read()
    flags = set(FLAG.findall(text))
    unknown = sorted(f for f in flags if f not in allowed)
    assert not unknown, f"{os.path.relpath(path, ROOT)}: flags unknown to {_consumers(path)}: {unknown}"
    if path in ARGS_FILES:
        assert len(flags) > 10


def test_flag_scan_catches_a_wrong_flag(tmp_path, known_options):
    """The scan itself: a misspelt or Megatron-LM-only flag is reported."""
    bad = tmp_path / "bad.sh"
    bad.write_text("torchrun pretrain_cocomix.py --num-layer 4 --use-flash-attn\n")
    flags = set(FLAG.findall(bad.read_text()))
    assert flags - known_options["train"] - known_options["torchrun"] == {"--num-layer", "--use-flash-attn"}


# ------------------------------------------------------------------------------------------------ dry runs
@pytest.fixture(scope="module")
def fake_inputs(tmp_path_factory) -> dict:
    """Files the scripts check for (existence only; nothing is loaded in a dry run)."""
    d = tmp_path_factory.mktemp("inputs")
    for suffix in (".bin", ".idx"):
        (d / f"owt_text_document{suffix}").write_bytes(b"")
    (d / "gpt2").mkdir()
    (d / "gpt2" / "config.json").write_text("{}")
    (d / "sae.pt").write_bytes(b"")
    (d / "ckpt").mkdir()
    for suffix in (".bin", ".idx", ".json"):
        (d / f"labels{suffix}").write_bytes(b"")
    return {"DATA_PATH": str(d / "owt_text_document"), "TEACHER": str(d / "gpt2"), "SAE": str(d / "sae.pt"),
            "CHECKPOINT_DIR": str(d / "ckpt"), "LABELS": str(d / "labels")}


def _run(script: str, env: dict, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in SCRIPT_SETTINGS and not k.startswith("SLURM_")}
    full_env.update(env)
    result = subprocess.run(["bash", os.path.join(EXAMPLES, script), *extra], env=full_env, capture_output=True,
                            text=True, timeout=60)
    if check:
        assert result.returncode == 0, f"{script}: {result.stderr}"
    return result


def _split_command(line: str, program: str = "pretrain_cocomix.py") -> tuple:
    tokens = shlex.split(line)
    index = next(i for i, t in enumerate(tokens) if t.endswith(program))
    return tokens[:index], tokens[index + 1:]


def _parse_launcher(launcher_tokens: list) -> argparse.Namespace:
    if launcher_tokens[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        return get_args_parser().parse_args(launcher_tokens[1:] + ["x.py"])
    assert launcher_tokens[0] == "deepspeed"
    import deepspeed.launcher.runner as runner

    return runner.parse_args(launcher_tokens[1:] + ["x.py"])


def _world_size(launcher: argparse.Namespace) -> int:
    nodes = int(str(getattr(launcher, "nnodes", None) or getattr(launcher, "num_nodes", 1)).split(":")[-1])
    per_node = getattr(launcher, "nproc_per_node", None) or getattr(launcher, "num_gpus", None)
    return max(nodes, 1) * int(per_node)


def _dry_run_args(script: str, env: dict, *extra: str) -> tuple:
    """(launcher namespace, validated training args) of a script's DRY_RUN command."""
    out = _run(script, dict(env, DRY_RUN="1"), *extra).stdout.strip().splitlines()[-1]
    launcher_tokens, train_tokens = _split_command(out)
    launcher = _parse_launcher(launcher_tokens)
    args = parse_args(train_tokens, world_size=_world_size(launcher))
    if args.deepspeed:
        from megatron_cocomix.training.deepspeed_backend import check_deepspeed_config

        check_deepspeed_config(args, json.load(open(args.deepspeed_config)), args.deepspeed_config)
    return launcher, args


def _check_paper_schedule(args: argparse.Namespace, size: str) -> None:
    paper = PAPER[size]
    tokens_per_step = args.global_batch_size * args.seq_length
    assert args.seq_length == 1024 and args.max_position_embeddings == 1024
    assert tokens_per_step == paper["batch_tokens"]
    assert TRAIN_TOKENS <= args.train_iters * tokens_per_step < TRAIN_TOKENS + tokens_per_step
    assert args.lr_warmup_iters == args.train_iters // 300
    assert args.lr == paper["lr"] and args.min_lr == pytest.approx(0.1 * paper["lr"])
    assert args.lr_decay_style == "cosine" and args.lr_decay_iters == args.train_iters
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.95, 1e-8)
    assert (args.weight_decay, args.clip_grad, args.bf16) == (0.1, 1.0, True)
    assert (args.num_layers, args.num_attention_heads) == (paper["layers"], paper["heads"])
    assert args.position_embedding_type == "learned_absolute" and not args.untie_embeddings_and_output_weights
    assert args.tokenizer_type == "GPT2BPETokenizer"
    assert args.global_batch_size == args.micro_batch_size * args.data_parallel_size * args.num_micro_batches


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
@pytest.mark.parametrize("size", list(PAPER))
def test_paper_cocomix_config(size, launcher, fake_inputs):
    env = {k: fake_inputs[k] for k in ("DATA_PATH", "TEACHER", "SAE", "CHECKPOINT_DIR")}
    ns, args = _dry_run_args(f"pretrain_cocomix_{size}.sh", dict(env, LAUNCHER=launcher))
    assert _world_size(ns) == 8
    _check_paper_schedule(args, size)
    paper = PAPER[size]
    assert args.hidden_size == paper["d"] and args.cocomix and args.concept_layer == paper["concept_layer"]
    assert (args.concept_topk, args.concept_num_labels, args.concept_loss_weight) == (32, 4, 0.1)
    assert args.concept_mixing == "interleave" and not args.no_concept_loss
    assert (args.concept_labels, args.teacher_model, args.teacher_layer, args.sae) == (
        "online", fake_inputs["TEACHER"], 6, fake_inputs["SAE"])
    assert args.deepspeed == (launcher == "deepspeed")
    assert args.use_distributed_optimizer == (launcher == "torchrun")
    expected_tp = 2 if size == "1.38b" else 1
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (expected_tp, 1)
    assert args.sequence_parallel == (expected_tp > 1)


@pytest.mark.parametrize("size", list(PAPER))
def test_paper_ntp_config(size, fake_inputs):
    env = {k: fake_inputs[k] for k in ("DATA_PATH", "CHECKPOINT_DIR")}
    _, args = _dry_run_args(f"pretrain_ntp_{size}.sh", env)
    _check_paper_schedule(args, size)
    assert args.hidden_size == PAPER[size]["ntp_d"]
    assert not (args.cocomix or args.kd or args.pause_tokens) and args.teacher_model is None
    _, cocomix = _dry_run_args(f"pretrain_cocomix_{size}.sh",
                               {k: fake_inputs[k] for k in ("DATA_PATH", "TEACHER", "SAE", "CHECKPOINT_DIR")})
    # Same data, schedule and layout as the CoCoMix run it is compared with: only the model differs.
    same = ("train_iters", "global_batch_size", "micro_batch_size", "seq_length", "lr", "min_lr", "lr_warmup_iters",
            "seed", "split", "tensor_model_parallel_size", "hidden_dropout", "attention_dropout")
    assert {k: getattr(args, k) for k in same} == {k: getattr(cocomix, k) for k in same}


def test_precomputed_labels_and_extraction(fake_inputs):
    env = {k: fake_inputs[k] for k in ("DATA_PATH", "TEACHER", "SAE", "CHECKPOINT_DIR")}
    _, args = _dry_run_args("pretrain_cocomix_386m.sh", dict(env, CONCEPT_LABELS=fake_inputs["LABELS"]))
    assert args.concept_labels == fake_inputs["LABELS"] and args.teacher_model is None
    # EXTRACT_LABELS runs tools/extract_concepts.py with the training flags, so the labels cover its samples.
    out = _run("pretrain_cocomix_386m.sh", dict(env, CONCEPT_LABELS="/tmp/out/labels", EXTRACT_LABELS="1",
                                                 DRY_RUN="1")).stdout.strip()
    launcher_tokens, tokens = _split_command(out, "extract_concepts.py")
    extract = _tool_parser("extract_concepts").parse_args(tokens)
    assert extract.output_prefix == "/tmp/out/labels" and extract.teacher_layer == 6
    assert (extract.train_iters, extract.global_batch_size, extract.seq_length) == (
        args.train_iters, args.global_batch_size, args.seq_length)


@pytest.mark.parametrize("mode", ["kd", "pause", "add", "concept-only", "mixing-only"])
def test_baselines(mode, fake_inputs):
    env = {k: fake_inputs[k] for k in ("DATA_PATH", "TEACHER", "SAE", "CHECKPOINT_DIR")}
    _, args = _dry_run_args("pretrain_baselines.sh", dict(env, MODE=mode, SIZE="69m"))
    _check_paper_schedule(args, "69m")
    expected = {
        "kd": dict(kd=True, kd_weight=0.1, cocomix=False, hidden_size=624),
        "pause": dict(pause_tokens=True, cocomix=False, concept_layer=3, hidden_size=512),
        "add": dict(cocomix=True, concept_mixing="add", no_concept_loss=False, hidden_size=512),
        "concept-only": dict(cocomix=True, concept_mixing="none", no_concept_loss=False, hidden_size=512),
        "mixing-only": dict(cocomix=True, concept_mixing="interleave", no_concept_loss=True, hidden_size=512),
    }[mode]
    assert {k: getattr(args, k) for k in expected} == expected


def test_baselines_other_sizes(fake_inputs):
    env = {k: fake_inputs[k] for k in ("DATA_PATH", "TEACHER", "SAE", "CHECKPOINT_DIR")}
    _, args = _dry_run_args("pretrain_baselines.sh", dict(env, MODE="kd", SIZE="1.38b"))
    _check_paper_schedule(args, "1.38b")
    assert args.hidden_size == 2096 and args.tensor_model_parallel_size == 2
    _, args = _dry_run_args("pretrain_baselines.sh", dict(env, MODE="add", SIZE="386m"))
    _check_paper_schedule(args, "386m")
    assert (args.hidden_size, args.concept_layer) == (1024, 5)


# ------------------------------------------------------------------------------------------------ multi-node
def test_multinode_deepspeed(fake_inputs):
    env = {k: fake_inputs[k] for k in ("DATA_PATH", "TEACHER", "SAE", "CHECKPOINT_DIR")}
    hostfile = os.path.join(EXAMPLES, "multinode", "hostfile.example")
    ns, args = _dry_run_args("multinode/launch_deepspeed.sh", dict(env, HOSTFILE=hostfile))
    assert (ns.hostfile, ns.num_nodes, ns.master_addr) == (hostfile, 4, "node-001")
    assert _world_size(ns) == 32 and args.deepspeed and args.data_parallel_size == 16
    _check_paper_schedule(args, "1.38b")


def test_multinode_torchrun(fake_inputs):
    env = {k: fake_inputs[k] for k in ("DATA_PATH", "TEACHER", "SAE", "CHECKPOINT_DIR")}
    ns, args = _dry_run_args("multinode/launch_torchrun.sh",
                             dict(env, NNODES="2", MASTER_ADDR="node-001", CONFIG="pretrain_cocomix_386m"))
    assert (ns.rdzv_backend, ns.rdzv_endpoint, ns.nnodes) == ("c10d", "node-001:6000", "2")
    assert args.data_parallel_size == 16 and args.hidden_size == 1024
    ns, _ = _dry_run_args("multinode/launch_torchrun.sh",
                          dict(env, NNODES="2", MASTER_ADDR="node-001", RDZV_BACKEND="static", NODE_RANK="1"))
    assert (ns.node_rank, ns.master_addr) == (1, "node-001")
    missing = _run("multinode/launch_torchrun.sh", dict(env, NNODES="2", MASTER_ADDR="n", RDZV_BACKEND="static",
                                                        DRY_RUN="1"), check=False)
    assert missing.returncode == 2 and "NODE_RANK is not set" in missing.stderr


def test_slurm(fake_inputs):
    env = {k: fake_inputs[k] for k in ("DATA_PATH", "TEACHER", "SAE", "CHECKPOINT_DIR")}
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=ROOT, MASTER_ADDR="gpu-017",
               CONFIG="pretrain_ntp_69m", DRY_RUN="1")
    lines = _run("multinode/slurm_cocomix.sbatch", env).stdout.strip().splitlines()
    srun = shlex.split(lines[0])
    assert srun[:5] == ["srun", "--nodes", "2", "--ntasks-per-node", "1"]
    launcher_tokens, train_tokens = _split_command(lines[-1])
    ns = _parse_launcher(launcher_tokens)
    assert (ns.rdzv_id, ns.rdzv_endpoint, ns.nnodes) == ("4242", "gpu-017:6000", "2")
    args = parse_args(train_tokens, world_size=_world_size(ns))
    assert args.data_parallel_size == 16 and args.hidden_size == 624
    sbatch_lines = [l for l in open(os.path.join(EXAMPLES, "multinode", "slurm_cocomix.sbatch")) if
                    l.startswith("#SBATCH")]
    assert any("--ntasks-per-node=1" in l for l in sbatch_lines)
    # 3 nodes: 24 data-parallel ranks do not divide the 512-sequence batch; the trainer says so in one line.
    lines = _run("multinode/slurm_cocomix.sbatch", dict(env, SLURM_JOB_NUM_NODES="3")).stdout.strip().splitlines()
    launcher_tokens, train_tokens = _split_command(lines[-1])
    with pytest.raises(ValueError, match="--global-batch-size 512 is not divisible by --micro-batch-size 16 x "
                                         "data-parallel size 24"):
        parse_args(train_tokens, world_size=_world_size(_parse_launcher(launcher_tokens)))


# ------------------------------------------------------------------------------------------- input errors
@pytest.mark.parametrize("script, env, message", [
    ("pretrain_cocomix_69m.sh", {}, "error: DATA_PATH is not set"),
    ("pretrain_cocomix_69m.sh", {"DATA_PATH": "@data"}, "error: CHECKPOINT_DIR is not set"),
    ("pretrain_cocomix_69m.sh", {"DATA_PATH": "@data", "CHECKPOINT_DIR": "@ckpt"}, "error: TEACHER is not set"),
    ("pretrain_cocomix_69m.sh", {"DATA_PATH": "@data", "CHECKPOINT_DIR": "@ckpt", "TEACHER": "@teacher"},
     "error: SAE is not set"),
    ("pretrain_cocomix_69m.sh", {"DATA_PATH": "/nonexistent/owt", "CHECKPOINT_DIR": "@ckpt"},
     "error: DATA_PATH: no /nonexistent/owt.bin / /nonexistent/owt.idx"),
    ("pretrain_cocomix_386m.sh", {"DATA_PATH": "@data", "CHECKPOINT_DIR": "@ckpt", "TEACHER": "/nonexistent/gpt2",
                                  "SAE": "@sae"}, "error: TEACHER=/nonexistent/gpt2: no such file or directory"),
    ("pretrain_cocomix_1.38b.sh", {"DATA_PATH": "@data", "CHECKPOINT_DIR": "@ckpt", "TEACHER": "@teacher",
                                   "SAE": "/nonexistent/sae.pt"}, "error: SAE=/nonexistent/sae.pt: no such file"),
    ("pretrain_ntp_69m.sh", {"DATA_PATH": "@data", "CHECKPOINT_DIR": "@ckpt", "LAUNCHER": "mpirun"},
     "error: LAUNCHER=mpirun: expected torchrun or deepspeed"),
    ("pretrain_ntp_69m.sh", {"DATA_PATH": "@data", "CHECKPOINT_DIR": "@ckpt", "ZERO_STAGE": "4"},
     "error: ZERO_STAGE=4: no"),
    ("pretrain_baselines.sh", {}, "error: MODE is not set"),
    ("pretrain_baselines.sh", {"MODE": "kd", "SIZE": "7b"}, "error: SIZE=7b: expected 69m, 386m or 1.38b"),
    ("multinode/launch_deepspeed.sh", {}, "error: HOSTFILE is not set"),
    ("multinode/launch_torchrun.sh", {}, "error: NNODES is not set"),
    ("multinode/slurm_cocomix.sbatch", {"SLURM_SUBMIT_DIR": ROOT}, "error: SLURM_JOB_ID is not set"),
])
def test_input_errors(script, env, message, fake_inputs):
    names = {"@data": fake_inputs["DATA_PATH"], "@ckpt": fake_inputs["CHECKPOINT_DIR"],
             "@teacher": fake_inputs["TEACHER"], "@sae": fake_inputs["SAE"]}
    env = {k: names.get(v, v) for k, v in env.items()}
    result = _run(script, dict(env, DRY_RUN="1"), check=False)
    assert result.returncode == 2, result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr


# --------------------------------------------------------------------------------------- parameter counts
def gpt_parameters(d: int, layers: int, vocab: int = GPT2_VOCAB, positions: int = 1024) -> int:
    """A GPT-2 block stack with biases and LayerNorms: per layer QKV (3d^2 + 3d), projection (d^2 + d), MLP
    (8d^2 + 5d), two LayerNorms (4d); final LayerNorm (2d); tied word embeddings (V d) and learned positions."""
    per_layer = 12 * d * d + 13 * d
    return layers * per_layer + 2 * d + vocab * d + positions * d


@pytest.mark.parametrize("size", list(PAPER))
def test_paper_parameter_counts(size):
    """The paper's sizes count the backbone plus one d x C concept matrix (the predictor): 68.3M / 388.5M / 1.381B
    for 69M / 386M / 1.38B, and the NTP widths 624 / 1072 / 2096 give 69.5M / 386.3M / 1.374B. This trainer's
    CoCoMix model also holds the C -> d compression (another d x C), 85.1M / 422.0M / 1.448B in all."""
    paper = PAPER[size]
    d, C = paper["d"], NUM_CONCEPTS
    predictor = d * C + C
    cocomix_paper = gpt_parameters(d, paper["layers"]) + predictor
    ntp = gpt_parameters(paper["ntp_d"], paper["layers"])
    assert cocomix_paper == pytest.approx(paper["params"], rel=0.02)
    assert ntp == pytest.approx(paper["params"], rel=0.02)
    assert ntp == pytest.approx(cocomix_paper, rel=0.05)  # parameter-matched
    with_compression = cocomix_paper + C * d + 2 * d  # compression weight [d, C], its bias and pre_bias [d]
    assert with_compression > ntp


@pytest.mark.parametrize("size", list(PAPER))
def test_parameter_formula_matches_trainer_estimate(size, fake_inputs):
    """The formula above against the trainer's own start-up count (training/flops.py), on the scripts' args."""
    from megatron_cocomix.data.tokenizer import vocab_size_with_padding
    from megatron_cocomix.training.flops import parameter_counts

    env = {k: fake_inputs[k] for k in ("DATA_PATH", "TEACHER", "SAE", "CHECKPOINT_DIR")}
    for script, width in ((f"pretrain_cocomix_{size}.sh", PAPER[size]["d"]),
                          (f"pretrain_ntp_{size}.sh", PAPER[size]["ntp_d"])):
        _, args = _dry_run_args(script, env)
        args.padded_vocab_size = vocab_size_with_padding(GPT2_VOCAB, args.make_vocab_size_divisible_by,
                                                         args.tensor_model_parallel_size)
        args.concept_dim = NUM_CONCEPTS
        expected = gpt_parameters(width, args.num_layers, vocab=args.padded_vocab_size)
        if args.cocomix:
            expected += 2 * width * NUM_CONCEPTS + NUM_CONCEPTS + 2 * width
        assert parameter_counts(args).unique_total == expected, script


# ---------------------------------------------------------------------------------------------- quickstart
def _read_args_file(path: str) -> list:
    """As pretrain_cocomix.py reads it: whole-line `#` comments, flags split on whitespace."""
    with open(path) as f:
        return [tok for line in f if not line.lstrip().startswith("#") for tok in line.split()]


def _parse_in_root(argv: list) -> argparse.Namespace:
    """parse_args(world_size=1) from the repository root, where relative paths in the examples point."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return parse_args(argv, world_size=1)
    finally:
        os.chdir(cwd)


def test_prepare_quickstart_data_is_idempotent(tmp_path):
    env = dict(os.environ, OUTPUT_DIR=str(tmp_path / "out"))
    first = subprocess.run(["bash", os.path.join(EXAMPLES, "prepare_quickstart_data.sh")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    prefix = str(tmp_path / "out" / "shakespeare_text_document")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    assert len(dataset.document_indices) - 1 == 781
    assert int(dataset.sequence_lengths.sum()) == 1505402  # examples/data/README.md
    stamp = os.path.getmtime(prefix + ".bin")
    second = subprocess.run(["bash", os.path.join(EXAMPLES, "prepare_quickstart_data.sh")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "already exists" in second.stdout
    assert os.path.getmtime(prefix + ".bin") == stamp


def test_quickstart_args_validate():
    """The args `python pretrain_cocomix.py` reads with no arguments, after install.sh prepared the data."""
    import pretrain_cocomix

    assert os.path.samefile(pretrain_cocomix.QUICKSTART_ARGS, ARGS_FILES[0])
    subprocess.run(["bash", os.path.join(EXAMPLES, "prepare_quickstart_data.sh")], check=True, capture_output=True,
                   timeout=300)
    argv = _read_args_file(ARGS_FILES[0])
    assert argv == pretrain_cocomix._quickstart_argv()
    args = _parse_in_root(argv)  # its paths are relative to the repository root
    for path in [p + ext for p in args.data_path for ext in (".bin", ".idx")] + [args.vocab_file, args.merge_file]:
        assert os.path.isfile(os.path.join(ROOT, path)), path
    assert not args.mock_data and args.tokenizer_type == "GPT2BPETokenizer"
    # 100K tokens: a minute or two on 2 cores.
    assert args.train_iters * args.global_batch_size * args.seq_length <= 200 * 4 * 128
    assert args.eval_interval < args.train_iters and args.log_interval <= 10
    with open(os.path.join(ROOT, "install.sh")) as f:
        assert "examples/prepare_quickstart_data.sh" in f.read()


# ------------------------------------------------------------------------------------------ tiny CPU CoCoMix
def test_tiny_cocomix_cpu(tmp_path):
    """The tiny teacher and SAE load and fit each other; the script's command validates with them."""
    from megatron_cocomix.concepts.sae import load_sae

    run_dir = tmp_path / "tiny"
    tool = _load_tool("make_tiny_teacher")
    assets = run_dir / "assets"
    os.makedirs(run_dir)
    assert tool.main(["--output-dir", str(assets), "--vocab-file", os.path.join(EXAMPLES, "data/gpt2/encoder.json"),
                      "--merge-file", os.path.join(EXAMPLES, "data/gpt2/vocab.bpe"), "--layers", "3",
                      "--hidden", "64", "--heads", "4", "--num-latents", "512", "--sae-k", "8"]) == 0
    sae = load_sae(str(assets / "sae"))
    assert (sae.d_model, sae.num_latents, sae.k) == (64, 512, 8)
    config = json.load(open(assets / "teacher" / "config.json"))
    assert (config["n_embd"], config["n_layer"], config["vocab_size"]) == (64, 3, GPT2_VOCAB)

    env = dict(os.environ, RUN_DIR=str(run_dir), DRY_RUN="1")
    line = subprocess.run(["bash", os.path.join(EXAMPLES, "tiny_cocomix_cpu.sh")], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()
    _, train_tokens = _split_command(line)
    args = _parse_in_root(train_tokens)
    assert args.cocomix and args.teacher_layer < config["n_layer"] and args.seq_length <= config["n_positions"]
    assert args.concept_topk <= sae.num_latents and 0 < args.concept_layer < args.num_layers

    line = subprocess.run(["bash", os.path.join(EXAMPLES, "tiny_cocomix_cpu.sh")], env=dict(env, MODE="ntp"),
                          capture_output=True, text=True, check=True).stdout.strip()
    _, ntp_tokens = _split_command(line)
    ntp = _parse_in_root(ntp_tokens)
    assert not ntp.cocomix and (ntp.hidden_size, ntp.train_iters) == (args.hidden_size, args.train_iters)


def test_make_tiny_teacher_bad_input(tmp_path, capsys):
    tool = _load_tool("make_tiny_teacher")
    assert tool.main(["--output-dir", str(tmp_path / "a"), "--hidden", "65", "--heads", "4"]) == 2
    assert "error: --hidden 65 is not divisible by --heads 4" in capsys.readouterr().err
    assert tool.main(["--output-dir", str(tmp_path / "missing" / "a")]) == 2
    assert "--output-dir" in capsys.readouterr().err
