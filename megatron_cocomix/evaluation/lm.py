"""Held-out language modelling: loss, perplexity and bits per byte of models over a .bin/.idx prefix.

Documents. megatron-core's GPTDataset splits and samples a prefix by *sequence* of its index (this project's
preprocessing writes one sequence per document, ending with the EOD token it appended), so a "document" here is
one sequence of the index. `--split` cuts the N sequences exactly as training does: split `k` is
[round(lo_k x N), round(hi_k x N)) with (lo_k, hi_k) megatron-core's normalised split matrix.

Scoring. A document d_0 .. d_{n-1} (d_{n-1} = EOD) is scored on its own. The model reads
x = (EOD, d_0, .., d_{n-2}) and predicts y = (d_0, .., d_{n-1}): the first token from one EOD of context, every
later token from the document's own preceding tokens; the final EOD is a target. Its NLL is
    NLL(d) = - sum_j log softmax(f(x_{<=j}))[y_j]
with the softmax over the tokenizer's vocabulary (the rows a Hugging Face export keeps: the padding rows of a
checkpoint's embedding table are dropped, so a checkpoint and its export give the same numbers).

Sliding window. When n > C (the context), windows over x are [b, e) with b = 0, stride, 2 stride, ..,
e = min(b + C, n), stopping at the first e = n; window w scores only the targets j in [e_{w-1}, e_w) (all of the
first window; the last `stride` of later ones, fewer at the end): every target is counted exactly once, with
at least C - stride tokens of context (the Hugging Face perplexity recipe).

Totals over D documents with T = sum n tokens:
    loss = sum_d NLL(d) / T            ppl = exp(loss)
    bits_per_byte = sum_d NLL(d) / ln 2 / B,   B = sum_d len(utf8(decode(d_0 .. d_{n-2})))
B counts the bytes of each scored document's decoded text *without* its final EOD token (the text the
preprocessing read, for a lossless tokenizer) while the EOD's NLL stays in the numerator, as is usual for bits per
byte over documents. The decoding is the run's tokenizer (the checkpoint's saved one, or the HF model's).

Precision. Every model runs in float32: a checkpoint's weights (bf16 / fp16 training included) are upcast
exactly, and an HF directory is loaded with dtype float32, so a checkpoint and its export (in any dtype) agree.

Batching. Windows of several documents go through one forward, right-padded with EOD. Attention is causal, so a
real position never sees the padding after it; padded targets are ignored. Windows are sorted by length (less
padding) and every NLL is summed per document in float64, so the numbers do not depend on the batch size beyond
float32 rounding in the kernels.
"""

from __future__ import annotations

import collections.abc
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy
import torch

from megatron_cocomix.data.datasets import IndexedDatasetSummary, validate_indexed_dataset

EVAL_SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT = "969,30,1"  # training's default --split (data/datasets.py)


# --------------------------------------------------------------------------------------------------- documents
def split_range(num_sequences: int, split: str, eval_split: str) -> Tuple[int, int]:
    """[begin, end) of the sequences that `split` gives to `eval_split`, computed as megatron-core's
    BlendedMegatronDatasetBuilder does (round(bound x N) on the normalised split matrix)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"--eval-split {eval_split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    try:
        with warnings.catch_warnings():  # megatron-core reads "a,b,c" as NaNs (numpy warns): refused below
            warnings.simplefilter("ignore", RuntimeWarning)
            weights = parse_and_normalize_split(split)
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError("not numbers")
        matrix = convert_split_vector_to_split_matrix(weights)
    except Exception as e:
        raise ValueError(f"--split {split!r}: not a list of 3 non-negative weights ({e})") from None
    bounds = matrix[EVAL_SPLITS.index(eval_split)]
    if bounds is None:
        return 0, 0
    return int(round(bounds[0] * float(num_sequences))), int(round(bounds[1] * float(num_sequences)))


@dataclass
class Documents:
    prefix: str
    split: Optional[str]
    eval_split: Optional[str]
    begin: int                  # first sequence index scored
    end: int                    # one past the last (before --max-documents)
    docs: Sequence[numpy.ndarray]  # token ids (the .bin's dtype), one array per document, read when indexed


def read_documents(prefix: str, split: Optional[str] = None, eval_split: Optional[str] = None,
                   max_documents: Optional[int] = None) -> Documents:
    """The documents to score: all sequences of `prefix`, or those `split` gives to `eval_split` (the split
    defaults to training's 969,30,1 when only eval_split is given); the first `max_documents` of them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    summary: IndexedDatasetSummary = validate_indexed_dataset(prefix)
    if split is not None and eval_split is None:
        raise ValueError("--split needs --eval-split (valid or test): which part of the documents to score")
    if eval_split is not None:
        split = split or DEFAULT_SPLIT
        begin, end = split_range(summary.num_sequences, split, eval_split)
    else:
        begin, end = 0, summary.num_sequences
    if max_documents is not None and max_documents <= 0:
        raise ValueError(f"--max-documents must be positive, got {max_documents}")
    stop = end if max_documents is None else min(end, begin + max_documents)
    dataset = IndexedDataset(prefix)
    # An empty sequence predicts nothing.
    docs = _DocumentReader(dataset, [i for i in range(begin, stop) if dataset.sequence_lengths[i] > 0])
    if not docs:
        raise ValueError(f"--data-path {prefix}: no document to score (split {split}, eval split {eval_split})")
    return Documents(prefix, split, eval_split, begin, end, docs)


class _DocumentReader(collections.abc.Sequence):
    """Documents read from the memory-mapped .bin when indexed, as copies: megatron-core's IndexedDataset unmaps
    the file when it is collected, and a view would then read freed memory."""

    def __init__(self, dataset, indices: List[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return numpy.array(self.dataset[self.indices[k]])


def windows(n: int, context: int, stride: int) -> List[Tuple[int, int, int]]:
    """(begin, end, first scored) input windows over a document of n targets (see the module docstring)."""
    if n <= context:
        return [(0, n, 0)]
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + context, n)
        out.append((begin, end, prev_end))
        if end == n:
            return out
        prev_end, begin = end, begin + stride


# ------------------------------------------------------------------------------------------------------ models
@dataclass
class Scorer:
    """A model ready to score: logits(tokens [b, s], mask [b, s]) -> [b, s, >= vocab_size] (any float dtype).

    Under a launcher (evaluation/parallel.py) a model may be split over ranks: `target_log_probs(tokens, mask,
    targets)` then replaces `logits` and returns log p(targets) [b, s] on the one rank of each model replica that
    holds them (None on the others); every rank calls it with the same batches in lockstep. `data_parallel`
    (rank, size) says which share of the batches this replica scores, `all_reduce` sums tensors over the world."""

    name: str
    kind: str                # "checkpoint" or "hf"
    path: str
    parameters: int
    max_context: int         # longest input the model takes (positions)
    default_context: int     # the trained sequence length when known
    eod: int
    vocab_size: int          # softmax over ids [0, vocab_size)
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    decode: Callable[[Sequence[int]], str]
    extra: Dict[str, object] = field(default_factory=dict)
    # A CoCoMix model's concept layer: tokens [b, s] -> concept logits [b, s, C], and the k of its top-k.
    concept_logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    concept_topk: Optional[int] = None
    target_log_probs: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]] = None
    data_parallel: Tuple[int, int] = (0, 1)
    all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def log_probs(self, tokens: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        if self.target_log_probs is not None:
            return self.target_log_probs(tokens, mask, targets)
        return log_probs_of_targets(self.logits(tokens, mask), targets, self.vocab_size)

    def my_batches(self, batches: List) -> List:
        """This replica's share of `batches` (replica_share), padded with empty batches."""
        return replica_share(batches, self.data_parallel, [])


def replica_share(items: List, data_parallel: Tuple[int, int], empty) -> List:
    """Replica `rank` of `size`'s share of `items` (every `size`-th), padded with `empty` to the same count on every
    replica, so all ranks call the model equally often."""
    rank, size = data_parallel
    if size == 1:
        return items
    mine = items[rank::size]
    return mine + [empty] * (-(-len(items) // size) - len(mine))


def log_probs_of_targets(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log softmax over the ids [0, vocab_size) (padding rows of the table dropped) at the targets: [b, s]."""
    logits = logits[..., :vocab_size].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.to(logits.device).unsqueeze(-1)).squeeze(-1)


def _hf_tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, trust_remote_code=True, local_files_only=True)


def _decoder(tokenizer) -> Callable[[Sequence[int]], str]:
    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return decode


def check_checkpoint(root: str, iteration: Optional[int]) -> str:
    """Fail early (one line) on a directory without a complete iteration or without a saved tokenizer."""
    from megatron_cocomix.conversion.checkpoint import find_checkpoint, read_common

    path = find_checkpoint(root, iteration)
    if (read_common(path).get("export") or {}).get("tokenizer") is None:
        raise ValueError(f"{path} records no tokenizer: export it with tools/convert_to_hf.py and its tokenizer "
                         f"flags, then evaluate the export with --hf-model")
    return path


def tokens_seen(path: str) -> Optional[int]:
    """Tokens a checkpoint's run trained on: consumed samples x sequence length (training's `tokens` scalar)."""
    from megatron_cocomix.conversion.checkpoint import read_common

    common = read_common(path)
    seq_length = ((common.get("export") or {}).get("args") or {}).get("seq_length")
    samples = common.get("consumed_train_samples")
    return int(samples) * int(seq_length) if samples is not None and seq_length else None


def check_hf_dir(path: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--hf-model {path}: no config.json there")


def checkpoint_scorer(root: str, iteration: Optional[int] = None, name: Optional[str] = None) -> Scorer:
    """The checkpoint's own megatron model (TP1, this process) and its saved tokenizer."""
    from megatron_cocomix.conversion.checkpoint import load_checkpoint_tp1, megatron_logits

    check_checkpoint(root, iteration)
    loaded = load_checkpoint_tp1(root, iteration)
    # fp32 whatever the training dtype (bf16 / fp16 weights upcast exactly), as an export is loaded here: the
    # megatron model in bf16 on CPU also trips on mixed-dtype norms.
    model = loaded.model.float()
    concept_logits = _megatron_concept_logits(model)
    scorer = loaded_checkpoint_scorer(loaded, root, name, logits=lambda tokens, mask: megatron_logits(model, tokens))
    scorer.parameters = _parameters_without_padding(model, loaded.args.padded_vocab_size, scorer.vocab_size)
    scorer.concept_logits = concept_logits
    scorer.concept_topk = loaded.args.concept_topk if concept_logits else None
    return scorer


def loaded_checkpoint_scorer(loaded, root: str, name: Optional[str], **fields) -> Scorer:
    """The Scorer of a loaded checkpoint (conversion/checkpoint.LoadedCheckpoint): its saved tokenizer, contexts
    and vocabulary; `fields` give the model's callables (and override anything else)."""
    from megatron_cocomix.conversion.tokenizer_files import write_tokenizer

    args, state = loaded.args, loaded.tokenizer
    # The rows an export keeps (conversion/export.build_hf_model): an imported model may have more than its
    # tokenizer, the rest is padding.
    vocab_size = max(state["vocab_size"], getattr(args, "hf_vocab_size", None) or 0)
    with tempfile.TemporaryDirectory() as directory:
        write_tokenizer(state, directory, args.seq_length)
        tokenizer = _hf_tokenizer(directory)
    learned = getattr(args, "position_embedding_type", "learned_absolute") == "learned_absolute"
    max_context = (args.max_position_embeddings or args.seq_length) if learned else 10 ** 9
    values = dict(name=name or os.path.basename(os.path.normpath(root)), kind="checkpoint", path=loaded.path,
                  parameters=0, max_context=max_context, default_context=args.seq_length, eod=int(state["eod"]),
                  vocab_size=vocab_size, logits=None, decode=_decoder(tokenizer),
                  extra={"iteration": loaded.iteration, "tokens_seen": tokens_seen(loaded.path)})
    values.update(fields)
    return Scorer(**values)


def _megatron_concept_logits(model: torch.nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """Concept logits of a megatron CoCoMix model, read from its concept predictor during a forward (TP1)."""
    from megatron_cocomix.conversion.checkpoint import megatron_logits
    from megatron_cocomix.model.concept_mixing import ConceptMixing, find_concept_mixing

    mixing = find_concept_mixing(model)
    if not isinstance(mixing, ConceptMixing):  # NTP, KD, pause
        return None
    captured = []

    def concept_logits(tokens: torch.Tensor) -> torch.Tensor:
        handle = mixing.predictor.register_forward_hook(lambda module, inputs, output: captured.append(output[0]))
        try:
            megatron_logits(model, tokens)
        finally:
            handle.remove()
        return captured.pop().transpose(0, 1).float()  # [s, b, C] -> [b, s, C]
    return concept_logits


def _parameters_without_padding(model: torch.nn.Module, padded_vocab_size: int, vocab_size: int) -> int:
    """Parameters of the megatron model less its vocabulary padding rows (the count of its export)."""
    total = 0
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        total += p.numel()
        if ("word_embeddings" in name or "output_layer" in name) and p.shape[0] == padded_vocab_size:
            total -= (padded_vocab_size - vocab_size) * p[0].numel()
    return total


def hf_contexts(config, tokenizer) -> Tuple[int, int]:
    """(longest input, default context) of a transformers model: its positions, and the trained sequence length
    an export's tokenizer records (stock tokenizers: the model's positions, or a huge sentinel when unknown)."""
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    max_context = int(positions) if positions else 10 ** 9
    trained = getattr(tokenizer, "model_max_length", None)
    default_context = min(max_context, int(trained)) if trained and trained < 10 ** 8 else max_context
    return max_context, default_context


def load_hf(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, device): a transformers causal LM (remote code allowed: CoCoMix exports), local files
    only, in eval mode on the device megatron would use, and its tokenizer."""
    from transformers import AutoModelForCausalLM

    check_hf_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, local_files_only=True,
                                                 dtype=dtype).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where megatron puts a checkpoint
    model.to(device)
    return model, _hf_tokenizer(path), device


def hf_scorer(path: str, name: Optional[str] = None, dtype: torch.dtype = torch.float32) -> Scorer:
    """A transformers causal LM (remote code allowed: CoCoMix exports), local files only, and its tokenizer."""
    model, tokenizer, device = load_hf(path, dtype)
    config = model.config
    max_context, default_context = hf_contexts(config, tokenizer)
    eod = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    if eod is None:
        raise ValueError(f"--hf-model {path}: neither the tokenizer nor config.json names an eos token (the "
                         f"end-of-document token that starts every document)")

    def logits(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=tokens.to(device), attention_mask=mask.to(device), use_cache=False).logits

    concept_logits = None
    if getattr(config, "model_type", None) == "cocomix" and config.mixing == "concept":
        def concept_logits(tokens: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model.transformer(tokens.to(device))[1]

    return Scorer(name=name or os.path.basename(os.path.normpath(path)), kind="hf", path=os.path.abspath(path),
                  parameters=sum(p.numel() for p in model.parameters()), max_context=max_context,
                  default_context=default_context, eod=int(eod), vocab_size=int(config.vocab_size), logits=logits,
                  decode=_decoder(tokenizer), concept_logits=concept_logits,
                  concept_topk=int(config.concept_num) if concept_logits else None)


# ----------------------------------------------------------------------------------------------------- scoring
def resolve_context(scorer: Scorer, seq_length: Optional[int], stride: Optional[int]) -> Tuple[int, int]:
    context = seq_length or scorer.default_context
    if context <= 0 or context > scorer.max_context:
        raise ValueError(f"--seq-length {context}: {scorer.name} takes 1 to {scorer.max_context} positions")
    stride = stride or max(1, context // 2)
    if not 0 < stride <= context:
        raise ValueError(f"--stride {stride}: must be in [1, context = {context}]")
    return context, stride


def score(scorer: Scorer, docs: Sequence[numpy.ndarray], context: int, stride: int, batch_size: int = 8,
          progress: bool = False) -> Dict[str, float]:
    """{loss, ppl, bits_per_byte, nll, tokens, bytes, documents} of `scorer` over `docs` (module docstring)."""
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    nll = [0.0] * len(docs)
    bar = None
    if progress:
        from tqdm import tqdm

        # a replica scores a share of the windows: its bar counts them, against no total
        total = sum(len(d) for d in docs) if scorer.data_parallel[1] == 1 else None
        bar = tqdm(total=total, desc=f"evaluate {scorer.name}", unit="tok")
    # Documents are windowed a chunk at a time (memory); the chunk size is fixed, so the batches, and the
    # per-document sums, do not depend on anything but batch_size.
    for chunk in range(0, len(docs), _DOCUMENTS_PER_CHUNK):
        _score_chunk(scorer, docs, range(chunk, min(chunk + _DOCUMENTS_PER_CHUNK, len(docs))), context, stride,
                     batch_size, nll, bar)
    if bar is not None:
        bar.close()
    if scorer.all_reduce is not None:  # each document's windows were scored on one replica, zeros elsewhere
        nll = scorer.all_reduce(torch.tensor(nll, dtype=torch.float64)).tolist()
    total_nll = math.fsum(nll)
    tokens_scored = sum(len(d) for d in docs)
    num_bytes = sum(len(scorer.decode(d[:-1]).encode("utf-8")) for d in docs)
    loss = total_nll / tokens_scored
    return {"loss": loss, "ppl": math.exp(loss),
            "bits_per_byte": total_nll / math.log(2) / num_bytes if num_bytes else float("nan"),
            "nll": total_nll, "tokens": tokens_scored, "bytes": num_bytes, "documents": len(docs)}


_DOCUMENTS_PER_CHUNK = 1024


def _score_chunk(scorer: Scorer, docs: Sequence[numpy.ndarray], indices: range, context: int, stride: int,
                 batch_size: int, nll: List[float], bar) -> None:
    """Add the NLL of docs[i] (i in indices) to nll[i]."""
    rows = []  # (doc index, inputs, targets, first scored position in the window)
    for i in indices:
        doc = numpy.asarray(docs[i], dtype=numpy.int64)
        if int(doc.max()) >= scorer.vocab_size or int(doc.min()) < 0:
            bad = int(doc.max()) if int(doc.max()) >= scorer.vocab_size else int(doc.min())
            raise ValueError(f"token id {bad} of document {i} is outside {scorer.name}'s vocabulary "
                             f"[0, {scorer.vocab_size}): the data was preprocessed with another tokenizer")
        inputs = numpy.concatenate([[scorer.eod], doc[:-1]])
        for begin, end, first in windows(len(doc), context, stride):
            rows.append((i, inputs[begin:end], doc[begin:end], first - begin))
    rows.sort(key=lambda r: -len(r[1]))  # longest first: little padding, the biggest batch first (memory)
    batches = [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
    for batch in scorer.my_batches(batches):
        width = len(batch[0][1]) if batch else 1
        tokens = torch.full((len(batch), width), scorer.eod, dtype=torch.long)
        targets = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)
        for r, (_, x, y, first) in enumerate(batch):
            tokens[r, :len(x)] = torch.from_numpy(x)
            targets[r, :len(y)] = torch.from_numpy(y)
            mask[r, :len(x)] = 1
            scored[r, first:len(x)] = True
        logp = scorer.log_probs(tokens, mask, targets)
        if bar is not None:
            bar.update(int(scored.sum()))
        if logp is None:  # a rank of a split model that holds no output
            continue
        token_nll = ((-logp).double().cpu() * scored).sum(-1)
        for r, (i, _, _, _) in enumerate(batch):
            nll[i] += float(token_nll[r])


# ------------------------------------------------------------------------------------------------------ report
def data_label(row: dict) -> str:
    """The held-out corpus's name in a table's header (evaluate.py --data-name; 'held-out' without one)."""
    return row.get("data_name") or "held-out"


def markdown_table(rows: Sequence[dict]) -> str:
    """One row per model: name, parameters, tokens seen in training (checkpoints), held-out ppl (headed by the
    corpus's name), bits per byte, tokens scored."""
    lines = [f"| model | parameters | tokens seen | {data_label(rows[0]) if rows else 'held-out'} ppl | bits per byte "
             f"| tokens scored |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        seen = row.get("tokens_seen")
        lines.append(f"| {row['name']} | {format_count(row['parameters'])} | "
                     f"{format_count(seen) if seen is not None else '-'} | {row['ppl']:.4f} | "
                     f"{row['bits_per_byte']:.4f} | {row['tokens']:,} |")
    return "\n".join(lines) + "\n"


def format_count(n: int) -> str:
    for unit, size in (("B", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
