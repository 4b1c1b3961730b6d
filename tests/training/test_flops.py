"""training/flops.py against independent counts.

The reference for FLOPs is torch.utils.flop_counter.FlopCounterMode on a real forward + backward of a plain
PyTorch GPT written here with the same shapes (it counts every matmul the autograd graph runs, including
recomputed forwards under torch.utils.checkpoint). FlopCounterMode counts the full s x s attention products;
Megatron's convention (which flops.py follows) counts half of them for a causal mask, so the reference
subtracts half of what it measured inside the `core` attention modules. The activation-memory formula is
checked against the bytes autograd actually saves for backward (saved-tensor hooks) in a plain layer.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from megatron_cocomix.arguments import parse_args
from megatron_cocomix.concepts.teacher import read_teacher_shape
from megatron_cocomix.shapes import TransformerShape
from megatron_cocomix.training import flops, hardware, memory
from megatron_cocomix.training.logging import startup_report
from tests.helpers.launch import TINY_GPT

torch.manual_seed(0)


def make_args(*extra, world_size=1, vocab=256):
    args = parse_args(list(TINY_GPT) + list(extra), world_size=world_size)
    args.padded_vocab_size = vocab
    return args


# ---------------------------------------------------------------------------------------------------------
# A plain PyTorch GPT (no megatron-core).
# ---------------------------------------------------------------------------------------------------------

class CoreAttention(nn.Module):
    def forward(self, q, k, v):  # [b, heads, n, d]
        n = q.shape[-2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


class Layer(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        h, d = shape.hidden_size, shape.kv_channels
        self.heads, self.groups, self.d = shape.num_attention_heads, shape.num_query_groups, d
        self.gated = shape.gated_mlp
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv = nn.Linear(h, (self.heads + 2 * self.groups) * d)
        self.core = CoreAttention()
        self.proj = nn.Linear(self.heads * d, h)
        self.fc1 = nn.Linear(h, shape.ffn_hidden_size * (2 if self.gated else 1))
        self.fc2 = nn.Linear(shape.ffn_hidden_size, h)

    def attention(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split([self.heads * self.d, self.groups * self.d, self.groups * self.d], -1)
        q = q.view(b, n, self.heads, self.d).transpose(1, 2)
        k = k.view(b, n, self.groups, self.d).transpose(1, 2).repeat_interleave(self.heads // self.groups, 1)
        v = v.view(b, n, self.groups, self.d).transpose(1, 2).repeat_interleave(self.heads // self.groups, 1)
        return self.proj(self.core(q, k, v).transpose(1, 2).reshape(b, n, -1))

    def mlp(self, x):
        y = self.fc1(self.ln2(x))
        if self.gated:
            gate, up = y.chunk(2, -1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y)
        return self.fc2(y)

    def forward(self, x):
        x = x + self.attention(x)
        return x + self.mlp(x)


class PlainGPT(nn.Module):
    def __init__(self, shape: TransformerShape, untied: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(Layer(shape) for _ in range(shape.num_layers))
        self.final_ln = nn.LayerNorm(shape.hidden_size)
        self.output = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False) if untied else None

    def logits(self, x):
        x = self.final_ln(x)
        return self.output(x) if self.output is not None else x @ self.embedding.weight.t()


def measured(fn) -> float:
    """FlopCounterMode's total, with the attention cores counted at half (causal, Megatron's convention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    core = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
               if name != "Global" and name.endswith(".core"))
    return counter.get_total_flops() - core / 2


class CheckpointedCore(nn.Module):
    """Selective recompute: only the attention core runs again in backward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, q, k, v):
        return checkpoint(self.inner, q, k, v, use_reentrant=False)


def train_step(model, tokens, recompute=None):
    # Megatron's recompute runs the whole forward of a recomputed block again; torch's non-reentrant checkpoint
    # would stop as soon as the last tensor backward needs exists, skipping e.g. the final fc2.
    with set_checkpoint_early_stop(False):
        _train_step(model, tokens, recompute)


def _train_step(model, tokens, recompute):
    x = model.embedding(tokens)
    for layer in model.layers:
        if recompute == "full":
            x = checkpoint(layer, x, use_reentrant=False)
        elif recompute == "selective":
            core = layer.core
            layer.core = CheckpointedCore(core)
            x = layer(x)
            layer.core = core
        else:
            x = layer(x)
    loss = F.cross_entropy(model.logits(x).flatten(0, 1), tokens.flatten())
    loss.backward()


CONFIGS = {
    "gpt2_like": [],
    "llama_like": ["--swiglu", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "24",
                   "--untie-embeddings-and-output-weights", "--ffn-hidden-size", "96"],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_flops_match_flop_counter(name):
    args = make_args(*CONFIGS[name])
    shape = TransformerShape.from_args(args)
    model = PlainGPT(shape, untied=args.untie_embeddings_and_output_weights)
    tokens = torch.randint(0, shape.vocab_size, (args.global_batch_size, args.seq_length))
    reference = measured(lambda: train_step(model, tokens))
    assert flops.num_floating_point_operations(args) == pytest.approx(reference, rel=1e-12)
    # The per-token view used for the log line: 6N-style dominant terms plus attention and logits.
    assert flops.num_floating_point_operations(args) / (args.global_batch_size * args.seq_length) > \
        6 * sum(p.numel() for p in model.layers.parameters() if p.dim() == 2)


@pytest.mark.parametrize("recompute", [["--recompute-granularity", "full"],
                                       ["--recompute-granularity", "selective"]], ids=["full", "selective"])
def test_recompute_adds_the_recomputed_forward(recompute):
    args = make_args(*recompute)
    shape = TransformerShape.from_args(args)
    model = PlainGPT(shape)
    tokens = torch.randint(0, shape.vocab_size, (args.global_batch_size, args.seq_length))
    reference = measured(lambda: train_step(model, tokens, recompute=recompute[1]))
    assert flops.num_floating_point_operations(args, include_recompute=True) == pytest.approx(reference, rel=1e-12)
    assert flops.num_floating_point_operations(args) < reference  # model FLOPs leave recompute out


def test_block_recompute_counts_the_first_layers_of_each_chunk():
    args = make_args("--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1",
                     "--pipeline-model-parallel-size", "2", world_size=2)
    assert flops.recomputed_layers(args) == [0, 2]
    shape = TransformerShape.from_args(args)
    per_layer = flops.layer_linear_flops(shape, args.seq_length) + flops.layer_attention_core_flops(shape,
                                                                                                     args.seq_length)
    extra = flops.num_floating_point_operations(args, include_recompute=True) - flops.num_floating_point_operations(args)
    assert extra == pytest.approx(2 * per_layer * args.global_batch_size)


# ---------------------------------------------------------------------------------------------------------
# CoCoMix student and teacher
# ---------------------------------------------------------------------------------------------------------

def cocomix_step(model, tokens, concept_layer, predictor, compression, topk, concept_labels):
    """CoCoMix forward (docs/design.md §4) with the compression done sparsely as a batched matmul."""
    b, s = tokens.shape
    x = model.embedding(tokens)
    for layer in model.layers[:concept_layer]:
        x = layer(x)
    z = predictor(F.layer_norm(x, x.shape[-1:]))                     # [b, s, C]
    values, indices = z.topk(topk, dim=-1)                            # [b, s, k]
    columns = compression.weight.t()[indices]                         # [b, s, k, h]
    concept = (values.unsqueeze(-2) @ columns).squeeze(-2) + compression.bias
    x = torch.stack([x, concept], dim=2).reshape(b, 2 * s, -1)        # interleave: 2s positions
    for layer in model.layers[concept_layer:]:
        x = layer(x)
    logits = model.logits(x[:, 1::2])                                 # next-token logits from the concept slots
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss = loss + 0.1 * F.cross_entropy(z.flatten(0, 1), concept_labels.flatten())
    loss.backward()


def test_cocomix_student_flops_match_flop_counter():
    args = make_args()
    args.cocomix, args.concept_layer, args.concept_dim, args.concept_topk = True, 1, 512, 8
    args.concept_mixing, args.no_concept_loss, args.concept_labels = "interleave", False, "precomputed/prefix"
    shape = TransformerShape.from_args(args)
    model = PlainGPT(shape)
    predictor = nn.Linear(args.hidden_size, args.concept_dim)
    compression = nn.Linear(args.concept_dim, args.hidden_size)
    tokens = torch.randint(0, shape.vocab_size, (args.global_batch_size, args.seq_length))
    labels = torch.randint(0, args.concept_dim, (args.global_batch_size, args.seq_length))
    reference = measured(lambda: cocomix_step(model, tokens, args.concept_layer, predictor, compression,
                                              args.concept_topk, labels))
    assert flops.num_floating_point_operations(args) == pytest.approx(reference, rel=1e-12)
    # The 3 layers above the mixing layer run on 2s positions: > 2x their NTP cost (attention core 4x).
    ntp = make_args()
    assert flops.extra_flops_per_token(args) > 0
    assert flops.num_floating_point_operations(args) == pytest.approx(
        flops.num_floating_point_operations(ntp) + flops.extra_flops_per_token(args) * 8 * 32, rel=1e-12)


def teacher_labels(teacher, tokens, hook_layer, w_enc, w_dec, sae_topk):
    """Online labels: teacher forward, input-gradient backward down to hidden_states[hook_layer], SAE encode,
    attribution on the k active latents (docs/design.md §2-§3)."""
    x = teacher.embedding(tokens)
    for layer in teacher.layers[:hook_layer]:
        x = layer(x)
    hidden = x.detach().requires_grad_()
    x = hidden
    for layer in teacher.layers[hook_layer:]:
        x = layer(x)
    loss = F.cross_entropy(teacher.logits(x).flatten(0, 1), tokens.flatten())
    loss.backward()  # the teacher's weights are frozen: only input gradients, down to `hidden`
    grad = hidden.grad
    with torch.no_grad():
        pre = hidden.flatten(0, 1) @ w_enc.t()                                    # [T, C]
        values, indices = pre.topk(sae_topk, dim=-1)
        columns = w_dec.t()[indices]                                              # [T, k, d_t]
        scores = (columns @ grad.flatten(0, 1).unsqueeze(-1)).squeeze(-1) * values.relu()
        return indices.gather(-1, scores.topk(4, dim=-1).indices)


def test_teacher_flops_match_flop_counter():
    args = make_args()
    args.cocomix, args.concept_layer, args.concept_dim, args.concept_topk = True, 1, 512, 8
    args.concept_mixing, args.no_concept_loss, args.concept_labels, args.teacher_layer = "add", False, "online", 2
    teacher_shape = TransformerShape(num_layers=3, hidden_size=48, ffn_hidden_size=192, num_attention_heads=4,
                                     num_query_groups=4, kv_channels=12, vocab_size=256)
    args.teacher_shape, args.sae_topk = teacher_shape, 16
    teacher = PlainGPT(teacher_shape).requires_grad_(False)
    w_enc, w_dec = torch.randn(args.concept_dim, 48), torch.randn(48, args.concept_dim)
    tokens = torch.randint(0, 256, (args.global_batch_size, args.seq_length))
    reference = measured(lambda: teacher_labels(teacher, tokens, args.teacher_layer, w_enc, w_dec, sae_topk=16))
    terms = flops.teacher_flops_per_sequence(args)
    assert set(terms) == {"teacher forward", "teacher partial backward", "SAE encode", "attribution"}
    assert args.global_batch_size * sum(terms.values()) == pytest.approx(reference, rel=1e-12)
    # KD: forward only; precomputed labels: no teacher at all.
    args.kd, args.cocomix = True, False
    assert flops.teacher_flops_per_sequence(args) == {"teacher forward": terms["teacher forward"]}
    # KD from precomputed final states: the teacher's output layer on them, nothing else.
    args.kd_teacher_states = "states/prefix"
    head = measured(lambda: torch.nn.functional.linear(torch.randn(args.global_batch_size, args.seq_length, 48),
                                                       torch.randn(256, 48)))
    assert set(flops.teacher_flops_per_sequence(args)) == {"teacher forward"}
    assert args.global_batch_size * flops.teacher_flops_per_sequence(args)["teacher forward"] == pytest.approx(
        head, rel=1e-12)
    args.kd_teacher_states = None
    args.kd, args.cocomix, args.concept_labels = False, True, "labels/prefix"
    assert flops.teacher_flops_per_sequence(args) == {}


def test_teacher_shape_from_hf_configs():
    gpt2 = TransformerShape.from_hf_config({"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12,
                                                  "n_inner": None, "vocab_size": 50257})
    assert (gpt2.num_layers, gpt2.ffn_hidden_size, gpt2.kv_channels, gpt2.gated_mlp) == (12, 3072, 64, False)
    llama = TransformerShape.from_hf_config({"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                                                   "intermediate_size": 1536, "num_attention_heads": 9,
                                                   "num_key_value_heads": 3, "vocab_size": 49152})
    assert (llama.num_query_groups, llama.kv_channels, llama.gated_mlp) == (3, 64, True)
    with pytest.raises(FileNotFoundError, match="no-such-teacher"):
        read_teacher_shape("/no-such-teacher")


# ---------------------------------------------------------------------------------------------------------
# Peaks, parameters, memory
# ---------------------------------------------------------------------------------------------------------

def test_peak_table():
    assert hardware.peak_tflops("NVIDIA H200", sixteen_bit=True) == 989.0
    assert hardware.peak_tflops("NVIDIA H100 80GB HBM3", sixteen_bit=True) == 989.0
    assert hardware.peak_tflops("NVIDIA H100 PCIe", sixteen_bit=True) == 756.0
    assert hardware.peak_tflops("NVIDIA A100-SXM4-80GB", sixteen_bit=True) == 312.0
    assert hardware.peak_tflops("NVIDIA A100-SXM4-80GB", sixteen_bit=False) == 19.5
    assert hardware.peak_tflops("cpu", sixteen_bit=True) is None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_matches_plain_model_shapes(name):
    """Matrix parameters agree with the plain model (norm / bias layouts differ between the two models)."""
    args = make_args(*CONFIGS[name], "--disable-bias-linear", "--normalization", "RMSNorm",
                     "--position-embedding-type", "rope")
    shape = TransformerShape.from_args(args)
    model = PlainGPT(shape, untied=args.untie_embeddings_and_output_weights)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    norms = (2 * args.num_layers + 1) * args.hidden_size  # RMSNorm: one weight vector per norm
    assert memory.parameter_counts(args).unique_total == matrices + norms


def test_optimizer_bytes_per_parameter():
    args = make_args("--bf16", world_size=4)
    p = memory.parameter_counts(args).per_device(0, 1)
    plain = memory.memory_estimate(args)[0]
    assert (plain.weights + plain.grads + plain.optimizer) / p == pytest.approx(18)  # 2 + 4 + 12
    args = make_args("--bf16", "--use-distributed-optimizer", world_size=4)
    sharded = memory.memory_estimate(args)[0]
    assert (sharded.weights + sharded.grads + sharded.optimizer) / p == pytest.approx(6 + 12 / 4)
    args = make_args("--bf16", world_size=4)
    args.deepspeed, args.deepspeed_config_dict = True, {"zero_optimization": {"stage": 2}}
    zero2 = memory.memory_estimate(args)[0]
    assert (zero2.weights + zero2.grads + zero2.optimizer) / p == pytest.approx(2 + (2 + 12) / 4)


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)])
def test_layer_activations_match_korthikanti_closed_form(tp, sp):
    """s b h (10 + 24/t + 5 a s / (h t)) without sequence parallelism, s b h (34 + 5 a s / h) / t with it."""
    flags = ["--bf16", "--attention-backend", "local", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
             "--tensor-model-parallel-size", str(tp)] + (["--sequence-parallel"] if sp else [])
    args = make_args(*flags, world_size=tp)
    s, b, h, a = args.seq_length, args.micro_batch_size, args.hidden_size, args.num_attention_heads
    closed = s * b * h * ((34 / tp) if sp else (10 + 24 / tp)) + 5 * a * s * s * b / tp
    assert memory.layer_activation_bytes(args, s) == pytest.approx(closed)


def saved_activation_bytes(layer, x) -> int:
    """Bytes autograd keeps for backward of one layer (distinct storages, parameters excluded; the layer input
    counts, as the first norm keeps it)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def dropout(x, p):
    """Dropout with a one-byte boolean mask, as the CUDA kernels keep it (CPU's native dropout keeps a mask in the
    activation dtype)."""
    keep = torch.rand(x.shape) >= p
    return x * keep * (1.0 / (1.0 - p))


class DropoutLayer(Layer):
    """The plain layer with Megatron's dropouts (attention probabilities, both residual branches)."""

    def __init__(self, shape):
        super().__init__(shape)
        self.core.forward = self._core

    @staticmethod
    def _core(q, k, v):
        n = q.shape[-2]
        scores = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return dropout(scores.softmax(-1), 0.1) @ v

    def forward(self, x):
        x = x + dropout(self.attention(x), 0.1)
        return x + dropout(self.mlp(x), 0.1)


def test_layer_activations_match_saved_tensors():
    """The estimate for one bf16 layer (local attention, dropout) vs what autograd actually saves: within 2%
    (autograd also keeps the LayerNorm statistics and the causal mask, which the formula leaves out)."""
    args = make_args("--bf16", "--attention-backend", "local", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
                     "--micro-batch-size", "2")
    layer = DropoutLayer(TransformerShape.from_args(args)).to(torch.bfloat16)
    x = torch.randn(args.micro_batch_size, args.seq_length, args.hidden_size, dtype=torch.bfloat16,
                    requires_grad=True)
    saved = saved_activation_bytes(layer, x)
    assert memory.layer_activation_bytes(args, args.seq_length) == pytest.approx(saved, rel=0.02)


def test_memory_estimate_layout_effects():
    base = memory.memory_estimate(make_args("--bf16", "--pipeline-model-parallel-size", "2", world_size=2))
    # 1F1B: the first stage keeps two micro-batches in flight, the last one.
    assert base[0].activations > base[1].activations
    full = memory.memory_estimate(make_args("--bf16", "--pipeline-model-parallel-size", "2",
                                           "--recompute-granularity", "full", world_size=2))
    assert full[0].activations < base[0].activations
    report = startup_report(make_args("--bf16"))
    assert "FLOPs per iteration" in report and "memory estimate per device, stage 0" in report


def test_ablations_and_pause_tokens():
    ntp = flops.num_floating_point_operations(make_args())

    def cocomix(**overrides):
        args = make_args()
        args.cocomix, args.concept_layer, args.concept_dim, args.concept_topk = True, 1, 512, 8
        args.concept_mixing, args.no_concept_loss, args.concept_labels = "interleave", False, "labels/prefix"
        for key, value in overrides.items():
            setattr(args, key, value)
        return args

    head = 8 * 3 * 2 * 32 * 64 * 512          # batch x (fwd + bwd) x 2 s h C
    compression = 8 * 3 * 2 * 32 * 8 * 64     # batch x (fwd + bwd) x 2 s k h
    assert flops.layers_at_2x(cocomix()) == 3
    # Additive mixing: the NTP model plus the concept head and compression, nothing at 2s.
    assert flops.layers_at_2x(cocomix(concept_mixing="add")) == 0
    assert flops.num_floating_point_operations(cocomix(concept_mixing="add")) == ntp + head + compression
    # Neither mixing nor concept loss: the NTP model.
    assert flops.num_floating_point_operations(cocomix(concept_mixing="none", no_concept_loss=True)) == ntp
    # Concept prediction only.
    assert flops.num_floating_point_operations(cocomix(concept_mixing="none")) == ntp + head
    # Pause tokens: the same 2s layers as CoCoMix, no concept head.
    pause = make_args()
    pause.pause_tokens, pause.concept_layer = True, 1
    assert flops.num_floating_point_operations(pause) == \
        flops.num_floating_point_operations(cocomix()) - head - compression
