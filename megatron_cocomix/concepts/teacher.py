"""Frozen teacher LM (a local Hugging Face causal LM directory or a .gguf file) with a hook on its residual stream.

Hook point: `layer` = l means the residual stream after block l-1 (0-indexed blocks), i.e. HF's
`hidden_states[l]` for 1 <= l < num_layers (hidden_states[num_layers] has the final norm applied, so it is no
block output and is refused). For token ids [b, t]:

    h_l = block_{l-1}(... block_0(embed(tokens)))                       [b, t, d]
    L   = sum_b mean_{i < t-1} CE(logits[b, i], tokens[b, i+1])          per-sequence mean, summed over the batch
    g   = dL/dh_l                                                         [b, t, d]

Summing per-sequence means makes each sequence's gradient independent of its batch mates. All weights have
requires_grad False and the hook hands the blocks above a fresh leaf `h_l.detach().requires_grad_()`, so
autograd records the graph from the hook to the loss only and the backward never runs below layer l.
dtype: fp32 unless given (as the official teacher; `--teacher-dtype`, TEACHER_DTYPES); losses and logits are
computed in fp32. `tf32` keeps fp32 weights and lets CUDA fp32 matmuls use TF32 tensor cores inside the
teacher's (and, in attribution, the SAE's) work only (`Teacher.precision`); CPU matmuls are not affected.

Kernels: GPT-2's `gelu_new` (several elementwise kernels) is swapped at load for torch's fused tanh GELU, the same
function; the loss L reads the logits through the chunked linear cross-entropy of teacher_head.py
(`--teacher-lm-head chunked`, never the [b, t, V] fp32 logits) where the architecture allows it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_cocomix.concepts.teacher_head import IGNORE_INDEX, TEACHER_LM_HEADS, ChunkedLMHead, supports_chunked_head
from megatron_cocomix.shapes import TransformerShape

# --teacher-dtype -> storage dtype. The default stays fp32, because in bf16 only 80.6% of tokens kept the same
# label set (SmolLM2-135M, shipped corpus, on CPU; benchmarks/teacher_dtype.md); tf32 is fp32 storage with TF32
# matmuls on CUDA (its label agreement is measured on a GPU by benchmarks/teacher_dtype_agreement.py).
TEACHER_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Activation kernels replaced at load by a faster kernel of the same function: GPT-2's `gelu_new` is
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) written as separate ops; `gelu_pytorch_tanh` is torch's fused
# F.gelu(approximate="tanh") of the same formula.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}
_ACTIVATION_KEYS = ("activation_function", "hidden_act", "hidden_activation")

DEFAULT_CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers; one of them introduced E = mc^2.",
    "def main(argv):\n    return 0  # exit code\n",
    "  Leading spaces, trailing spaces,\tand tabs.  ",
    "Ünïcödé, emoji 🙂, and CJK 漢字 are tokenised too.",
    "HELLO World! hello world? 12345 67.89",
)


class _StopForward(Exception):
    """Raised by the hook to end a forward once the hooked layer is reached."""


def _split_gguf(path: str) -> tuple[str, Optional[str]]:
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    return path, None


def check_model_path(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher model {path}: no such file or directory")
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise ValueError(f"teacher model {path}: expected a Hugging Face model directory or a .gguf file")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"teacher model {path}: directory without config.json (not a Hugging Face model directory)")


@contextlib.contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """CUDA fp32 matmuls may use TF32 tensor cores inside the block; the previous setting is restored after
    (also on an exception). CPU matmuls are not affected. torch's legacy flag is used because setting it keeps
    the newer `fp32_precision` API consistent, while the reverse makes a later read of the legacy flag raise."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


def use_fused_activations(config) -> None:
    """Swap a config's activation names for FUSED_ACTIVATIONS' faster kernels of the same function."""
    for key in _ACTIVATION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, str) and value in FUSED_ACTIVATIONS:
            setattr(config, key, FUSED_ACTIVATIONS[value])


def load_hf_model(path: str, dtype: torch.dtype, fused_activations: bool = False) -> nn.Module:
    """The causal LM at `path` (HF directory or .gguf); `fused_activations` swaps in FUSED_ACTIVATIONS."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, gguf_file = _split_gguf(path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(directory, local_files_only=True, **kwargs)
    if fused_activations:
        use_fused_activations(config)
    if gguf_file is None:
        return AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=dtype, local_files_only=True)
    # transformers' own gguf path in from_pretrained needs `accelerate`; its dequantising reader does not.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = AutoModelForCausalLM.from_config(config)
    state = load_gguf_checkpoint(os.path.join(directory, gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"teacher model {path}: unexpected tensors {result.unexpected_keys[:5]}")
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing:
        raise ValueError(f"teacher model {path}: tensors missing from the gguf file: {sorted(missing)[:5]}")
    model.tie_weights()
    return model.to(dtype)


def load_teacher_tokenizer(path: str):
    """The teacher's own Hugging Face tokenizer (from the directory or the gguf file), offline."""
    from transformers import AutoTokenizer

    check_model_path(path)
    directory, gguf_file = _split_gguf(path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)


def _find_blocks(model: nn.Module, num_layers: int, path: str) -> nn.ModuleList:
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == num_layers]
    preferred = [c for c in candidates if c[0].split(".")[-1] in ("h", "layers", "blocks")]
    found = preferred or candidates
    if not found:
        raise ValueError(f"teacher model {path}: cannot find its {num_layers} transformer blocks")
    return found[0][1]


_CAUSAL_SDPA = "cocomix_causal_sdpa"


def _use_maskless_causal_attention(model: nn.Module) -> None:
    """A teacher only ever reads whole, unpadded causal sequences: its SDPA attention gets no mask and
    `is_causal`. transformers' own "sdpa" builds a mask in every forward and inspects the position ids on the host
    for packed sequences, which makes each teacher call wait for the device. The same SDPA function and the same
    numbers; an attention other than SDPA is left as loaded."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(_CAUSAL_SDPA, sdpa_attention_forward)
    model.set_attn_implementation(_CAUSAL_SDPA)


class Teacher(nn.Module):
    """A frozen causal LM with a hook at `hidden_states[layer]`; see the module docstring."""

    def __init__(self, model: nn.Module, layer: Optional[int], path: str = "<in memory>", tf32: bool = False,
                 lm_head: str = "chunked", check_ids: bool = True) -> None:
        """`layer=None`: no hook (next-token distributions only, as KD needs). `check_ids=False`: token ids are not
        range-checked per call (reading them would make the call wait for the device), for a caller that checked
        the student's tokenizer against the teacher's once (training)."""
        super().__init__()
        if lm_head not in TEACHER_LM_HEADS:
            raise ValueError(f"--teacher-lm-head {lm_head}: expected one of {', '.join(TEACHER_LM_HEADS)}")
        self.check_ids = check_ids
        config = model.config
        num_layers = config.num_hidden_layers
        if layer is not None and not 1 <= layer < num_layers:
            raise ValueError(f"--teacher-layer {layer} is out of range for teacher {path}: it has {num_layers} "
                             f"blocks, so the hook hidden_states[layer] needs 1 <= layer <= {num_layers - 1}")
        self.model = model.eval().requires_grad_(False)
        _use_maskless_causal_attention(model)
        self.path = path
        self.layer = layer
        self.num_layers = num_layers
        self.d_model = config.hidden_size
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self._mode: Optional[str] = None
        self._replace: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self._captured: Optional[torch.Tensor] = None
        self._final_states: Optional[list] = None
        if layer is not None:
            _find_blocks(model, num_layers, path)[layer - 1].register_forward_hook(self._hook)
        self.tf32 = tf32
        self._head = None
        if lm_head == "chunked" and supports_chunked_head(model):
            self._head = ChunkedLMHead(model.get_output_embeddings().weight)

    def precision(self) -> contextlib.AbstractContextManager:
        """The teacher's matmul precision (TF32 on CUDA for --teacher-dtype tf32), for its work and the SAE's."""
        return tf32_matmuls(self.tf32)

    @property
    def lm_head(self) -> str:
        """How the loss reads the logits: "chunked" (teacher_head.py) or "full" (the model's own logits)."""
        return "chunked" if self._head is not None else "full"

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher stays in eval mode (no dropout) whatever its owner does.
        return super().train(False)

    # ---------------------------------------------------------------------------------------------- the hook
    def _hook(self, module: nn.Module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if self._mode == "stop":
            self._captured = hidden
            raise _StopForward
        if self._mode == "grad":
            hidden = hidden.detach().requires_grad_()
            self._captured = hidden
        elif self._mode == "replace":
            hidden = self._replace(hidden)
        else:
            return None
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"teacher {self.path}: tokens must be an integer tensor [b, t], got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        if self.check_ids and tokens.numel() and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            raise ValueError(f"teacher {self.path}: token id {int(tokens.max())} is outside its vocabulary of "
                             f"{self.vocab_size} (the student data uses another tokenizer?)")
        return tokens.to(self.device, torch.long)

    def _run(self, mode: str, tokens: torch.Tensor):
        self._mode = mode
        try:
            with self.precision():
                return self.model(input_ids=tokens, use_cache=False)
        finally:
            self._mode = None

    def _losses(self, mode: Optional[str], tokens: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean next-token CE [b] of a forward in `mode` (the hook's behaviour)."""
        if self._head is None:
            return sequence_losses(self._run(mode, tokens).logits, tokens)
        self._mode = mode
        try:
            with self.precision():
                final = self.model.base_model(input_ids=tokens, use_cache=False).last_hidden_state
                if self._final_states is not None:
                    self._final_states.append(final.detach())
                ce = self._head.token_losses(final, next_token_targets(tokens))
        finally:
            self._mode = None
        return ce[:, :-1].mean(dim=1)

    # ------------------------------------------------------------------------------------------------ public
    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """h_l [b, t, d]; the forward stops at the hooked block."""
        tokens = self._check_tokens(tokens)
        try:
            self._run("stop", tokens)
        except _StopForward:
            pass
        hidden, self._captured = self._captured, None
        return hidden

    def hidden_and_grad(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h_l, dL/dh_l, L) with L the per-sequence mean next-token CE summed over the batch."""
        tokens = self._check_tokens(tokens)
        with torch.enable_grad():
            loss = self._losses("grad", tokens).sum()
            hidden, self._captured = self._captured, None
            with self.precision():
                (grad,) = torch.autograd.grad(loss, hidden)
        return hidden.detach(), grad, loss.detach()

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits [b, t, V] (model dtype), for the KD baseline."""
        return self._run(None, self._check_tokens(tokens)).logits

    @contextlib.contextmanager
    def keeping_final_states(self) -> Iterator[list]:
        """Inside the block, every loss forward (hidden_and_grad, sequence_losses) appends its final hidden states
        [b, t, d] (after the final norm: what the LM head reads) to the yielded list, so one forward serves the
        attribution and the KD baseline (`logits_from_final_states`). Needs the chunked head's plain linear head."""
        if self._head is None:
            raise ValueError(f"teacher {self.path}: its final hidden states are read where the head is a plain "
                             f"linear map of them (--teacher-lm-head chunked on GPT-2 / Llama-family teachers)")
        self._final_states = []
        try:
            yield self._final_states
        finally:
            self._final_states = None

    @torch.no_grad()
    def logits_from_final_states(self, final: torch.Tensor) -> torch.Tensor:
        """Next-token logits [b, t, V] from final hidden states [b, t, d] (keeping_final_states): the model's own
        head on them, so the numbers `logits` gives for the same tokens."""
        head = self.model.get_output_embeddings()
        return head(final.to(device=self.device, dtype=head.weight.dtype))

    @torch.no_grad()
    def sequence_losses(self, tokens: torch.Tensor,
                        replace: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """Mean next-token CE per sequence [b]; `replace` maps h_l to what the blocks above see (for the
        SAE's delta LM loss: replace = sae)."""
        tokens = self._check_tokens(tokens)
        self._replace = replace
        try:
            return self._losses("replace" if replace is not None else None, tokens)
        finally:
            self._replace = None


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [b, t] -> targets [b, t]: tokens[:, i+1] at position i, IGNORE_INDEX at the last position."""
    b, t = tokens.shape
    if t < 2:
        raise ValueError(f"sequences need at least 2 tokens for a next-token loss, got {t}")
    # The last position gets an ignored target instead of slicing the logits: a slice of the [b, t, V] logits
    # would be copied forward and zero-filled + copied again in backward (a large share of attribution time).
    return torch.cat([tokens[:, 1:], tokens.new_full((b, 1), IGNORE_INDEX)], dim=1)


def sequence_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean over the t-1 shifted predictions of CE(logits[:, i], tokens[:, i+1]), per sequence: [b]."""
    b, t = tokens.shape
    targets = next_token_targets(tokens)
    ce = F.cross_entropy(logits.float().reshape(b * t, -1), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="none")
    return ce.view(b, t)[:, :-1].mean(dim=1)


def load_teacher(path: str, layer: Optional[int], dtype: Optional[torch.dtype | str] = None,
                 device: Optional[torch.device | str] = None, lm_head: str = "chunked",
                 fused_activations: bool = True, check_ids: bool = True) -> Teacher:
    """Load a frozen teacher from a local HF directory (GPT-2, Llama family, ...) or a .gguf file (dequantised).

    Defaults: the CUDA device when available, fp32. `dtype` may be a torch dtype or a --teacher-dtype name
    (tf32: fp32 weights, TF32 matmuls on CUDA). `lm_head` and `fused_activations`: see the module docstring
    (the alternatives are the model's own head and kernels, kept for comparison). Nothing is downloaded.
    """
    path = os.fspath(path)
    check_model_path(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    tf32 = dtype == "tf32"
    if dtype is None:
        dtype = torch.float32
    elif isinstance(dtype, str):
        if dtype not in TEACHER_DTYPES:
            raise ValueError(f"--teacher-dtype {dtype}: expected one of {', '.join(TEACHER_DTYPES)}")
        dtype = TEACHER_DTYPES[dtype]
    if lm_head not in TEACHER_LM_HEADS:
        raise ValueError(f"--teacher-lm-head {lm_head}: expected one of {', '.join(TEACHER_LM_HEADS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = load_hf_model(path, dtype, fused_activations=fused_activations)
    return Teacher(model.to(device), layer, path, tf32=tf32, lm_head=lm_head, check_ids=check_ids)


def _student_encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "tokenize") and hasattr(tokenizer, "detokenize"):  # megatron tokenizer interface
        return list(tokenizer.tokenize(text))
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenizer_vocab_size(tokenizer) -> int:
    """Ids a tokenizer can produce: len() of a Hugging Face tokenizer (added tokens included), else the
    megatron-style tokenizer's vocab_size."""
    return int(tokenizer.vocab_size) if not hasattr(tokenizer, "__len__") else len(tokenizer)


def check_teacher_tokenizer(teacher_path: str, student_tokenizer, texts: Sequence[str] = DEFAULT_CHECK_TEXTS,
                            teacher_tokenizer=None) -> None:
    """Refuse a teacher whose tokenizer gives other ids than the student's (vocab size, then sample encodings).

    `student_tokenizer`: a megatron-style tokenizer (`tokenize`, `vocab_size`) or a HF tokenizer.
    `teacher_tokenizer`: the teacher's, when the caller has loaded it already (a .gguf's takes ~12 s to parse).
    """
    teacher_tok = teacher_tokenizer if teacher_tokenizer is not None else load_teacher_tokenizer(teacher_path)
    teacher_size, student_size = len(teacher_tok), tokenizer_vocab_size(student_tokenizer)
    if teacher_size != student_size:
        raise ValueError(f"teacher {teacher_path} has a vocabulary of {teacher_size} tokens but the student "
                         f"tokenizer has {student_size}: the teacher must share the student's tokenizer")
    for text in texts:
        ours, theirs = _student_encode(student_tokenizer, text), teacher_tok.encode(text, add_special_tokens=False)
        if list(ours) != list(theirs):
            raise ValueError(f"teacher {teacher_path} tokenises {text!r} as {list(theirs)[:12]} but the student "
                             f"tokenizer gives {list(ours)[:12]}: the teacher must share the student's tokenizer")


def read_teacher_shape(path: str) -> TransformerShape:
    """The teacher's shape from a local Hugging Face model directory (config.json) or a .gguf file's metadata,
    without loading any weight: read once at start-up to check --teacher-layer and size the FLOPs."""
    if os.path.isdir(path):
        import json

        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"teacher model {path}: no config.json")
        with open(config_path) as f:
            return TransformerShape.from_hf_config(json.load(f))
    if os.path.isfile(path) and path.endswith(".gguf"):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path),
                                            local_files_only=True)
        return TransformerShape.from_hf_config(config)
    raise FileNotFoundError(f"teacher model {path}: expected a Hugging Face model directory or a .gguf file")
