"""What each SAE latent responds to, read off a corpus (tools/describe_latents.py): per latent its activation
frequency, mean and largest activation, the tokens that carry it and its top-activating contexts, as the latent
pages of an SAE explorer show them; a short description made from its top tokens; a JSON-lines file that
`--latent-descriptions` reads and a self-contained HTML page (concepts/latent_pages.py).

Activations. For token windows x [n, s] (held-out documents, concatenated and cut as evaluate.py's concept
windows), the teacher's h = hidden_states[layer] [n, s, d] and the SAE's sparse code (concepts/sae.py: TopK of
the pre-activations, ReLU) give latent c the activation a_c(w, p) >= 0 at position p of window w: its value when
c is one of the token's k active latents, else 0. Positions p < skip count as 0 and are not scored (the first
positions' activations are outliers; tools/train_sae.py leaves them out too). Over the T scored positions:

    fired_c       = #{(w, p): a_c(w, p) > 0}              dead_c = (fired_c == 0)
    frequency_c   = fired_c / T
    mean_c        = sum_{w,p} a_c(w, p) / fired_c          (the mean where it fires)
    max_c         = max_{w,p} a_c(w, p)
    top tokens    = the ids x[w, p] where c fires, by count (ties: smaller id first)
    top contexts  = the N positions of largest a_c, each with x[w, p-W .. p+W] clipped to the window and
                    a_c on each of those tokens (ties at the N-th place are broken arbitrarily)

A position is identified by g = w * s + p (w the window's index among all windows), so the statistics do not
depend on how windows are shared among processes or batched.

Streaming (`LatentStats.update`, one batch [b, s] at a time): the code is scattered into a dense a [b*s, C];
counts, sums and maxima are summed; each latent's top N of the batch (torch.topk over its b*s activations) join
its running top N, and the best N of the 2N are kept; the (latent, token) pairs of the fired entries are counted
with torch.unique, compacted as they accumulate. Data parallel: each rank reads every world-th window and
`LatentStats.merge` combines the ranks' statistics (sums, and the top N of the union).

Description: its three most frequent tokens (whitespace shown as ␣, ↵, ⇥) and the share of its firings they
make up, e.g. "thee / thou / you (52%)"; when that share is below 25% the latent responds to many tokens and the
description says so with its frequency instead, e.g. "ROMEO / is / me (broad: 45% of tokens)"; a dead latent:
"dead (no activation on T tokens)".

JSON lines (`write_jsonl`), one object per latent in index order:

    {"index": 17, "description": "thee / thou / you (52%)", "dead": false, "frequency": 0.0123,
     "fired": 302, "tokens": 24576, "mean_activation": 2.31, "max_activation": 5.2,
     "top_tokens": [{"id": 931, "text": " thee", "count": 98, "share": 0.3245}, ...],
     "contexts": [{"activation": 5.2, "window": 40, "position": 77, "highlight": 8,
                   "ids": [...], "tokens": [" to", " thee", ...], "activations": [0.0, 5.2, ...]}, ...]}

"tokens" of a latent is T; a context's "tokens" are the decoded pieces of its "ids" (they join to the decoded
text), "activations" a_c on each, "highlight" the index of the max-activating token in them. Dead latents have
"mean_activation" and "max_activation" null and no top tokens or contexts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy
import torch

DESCRIPTION_TOKENS = 3
BROAD_SHARE = 0.25  # below: the top tokens carry too little of a latent to stand for it alone
_PENDING_PAIRS = 1 << 22  # (latent, token) pairs held before a compaction


@dataclass
class LatentStats:
    """Running statistics of C latents over windows of s tokens (module docstring); CPU tensors."""

    num_latents: int
    vocab_size: int
    seq_length: int
    top_n: int = 10
    context: int = 8  # W: tokens each side of a top context's position
    skip: int = 1
    tokens: int = 0
    fired: torch.Tensor = None  # [C] int64
    act_sum: torch.Tensor = None  # [C] float64
    act_max: torch.Tensor = None  # [C] float32
    top_values: torch.Tensor = None  # [C, N], 0 = empty
    top_positions: torch.Tensor = None  # [C, N] int64, -1 = empty
    top_contexts: torch.Tensor = None  # [C, N, 2W + 1] a_c around the position, NaN outside the window
    pair_keys: torch.Tensor = None  # unique latent * V + token
    pair_counts: torch.Tensor = None
    _pending: List[tuple] = field(default_factory=list)  # (keys, counts) not yet compacted

    def __post_init__(self) -> None:
        if not 0 <= self.skip < self.seq_length:
            raise ValueError(f"--skip-positions {self.skip} must be in [0, --seq-length {self.seq_length})")
        c, n, width = self.num_latents, self.top_n, 2 * self.context + 1
        if self.fired is None:
            self.fired = torch.zeros(c, dtype=torch.long)
            self.act_sum = torch.zeros(c, dtype=torch.float64)
            self.act_max = torch.zeros(c)
            self.top_values = torch.zeros(c, n)
            self.top_positions = torch.full((c, n), -1, dtype=torch.long)
            self.top_contexts = torch.full((c, n, width), float("nan"))
            self.pair_keys = torch.zeros(0, dtype=torch.long)
            self.pair_counts = torch.zeros(0, dtype=torch.long)

    # ------------------------------------------------------------------------------------------ streaming
    @torch.no_grad()
    def update(self, tokens: torch.Tensor, window_ids: torch.Tensor, values: torch.Tensor,
               indices: torch.Tensor) -> None:
        """Add windows tokens [b, s] (their indices window_ids [b]) with the SAE code values, indices [b, s, k]."""
        b, s = tokens.shape
        if s != self.seq_length:
            raise ValueError(f"windows of {s} tokens, expected {self.seq_length}")
        k = indices.shape[-1]
        values = values.float().cpu().clamp_min(0)
        values[:, : self.skip] = 0
        indices = indices.long().cpu()
        self.tokens += b * (s - self.skip)
        # Counts, sums, maxima and (latent, token) pairs from the b*s*k entries of the code.
        active = values > 0
        latents = indices[active]
        fired_values = values[active]
        self.fired += torch.bincount(latents, minlength=self.num_latents)
        self.act_sum += torch.bincount(latents, weights=fired_values.double(), minlength=self.num_latents)
        self.act_max.scatter_reduce_(0, latents, fired_values, reduce="amax")
        keys = latents * self.vocab_size + tokens.long().cpu()[..., None].expand(b, s, k)[active]
        self._pending.append((keys, torch.ones_like(keys)))
        if sum(keys.numel() for keys, _ in self._pending) > _PENDING_PAIRS:
            self._compact()

        # Each latent's top N of the batch from the dense a [C, b*s] (one row per latent).
        dense = torch.zeros(self.num_latents, b * s)
        dense.scatter_(0, indices.reshape(b * s, k).t(), values.reshape(b * s, k).t())
        positions = (window_ids.long().cpu()[:, None] * s + torch.arange(s)).reshape(-1)  # [b*s]
        n = min(self.top_n, b * s)
        batch_values, batch_index = dense.topk(n, dim=1)  # [C, n]
        offsets = torch.arange(-self.context, self.context + 1)
        column = batch_index % s
        around = column[..., None] + offsets  # [C, n, 2W+1] positions in the window
        inside = (around >= 0) & (around < s)
        gather_at = (batch_index - column)[..., None] + around.clamp(0, s - 1)
        contexts = dense.gather(1, gather_at.reshape(self.num_latents, -1)).reshape(around.shape)
        contexts = contexts.masked_fill(~inside, float("nan"))
        self._keep_top(torch.cat([self.top_values, batch_values], 1),
                       torch.cat([self.top_positions, positions[batch_index]], 1),
                       torch.cat([self.top_contexts, contexts], 1))

    def _keep_top(self, values: torch.Tensor, positions: torch.Tensor, contexts: torch.Tensor) -> None:
        """The best N candidates per latent: largest value first, then smallest position (empty entries last)."""
        by_position = torch.where(positions < 0, torch.iinfo(torch.long).max, positions).argsort(dim=1, stable=True)
        values, positions = values.gather(1, by_position), positions.gather(1, by_position)
        contexts = contexts.gather(1, by_position[..., None].expand_as(contexts))
        order = values.argsort(dim=1, descending=True, stable=True)[:, : self.top_n]
        self.top_values = values.gather(1, order)
        self.top_positions = positions.gather(1, order).masked_fill(self.top_values <= 0, -1)
        self.top_contexts = contexts.gather(1, order[..., None].expand(-1, -1, contexts.shape[-1]))

    def _compact(self) -> None:
        keys = torch.cat([self.pair_keys] + [keys for keys, _ in self._pending])
        counts = torch.cat([self.pair_counts] + [counts for _, counts in self._pending])
        self.pair_keys, inverse = torch.unique(keys, return_inverse=True)
        self.pair_counts = torch.zeros_like(self.pair_keys).scatter_add_(0, inverse, counts)
        self._pending = []

    # ---------------------------------------------------------------------------------------- data parallel
    def state(self) -> dict:
        """Everything `merge` needs, as plain tensors (for torch.distributed.gather_object)."""
        self._compact()
        return {name: getattr(self, name) for name in ("tokens", "fired", "act_sum", "act_max", "top_values",
                                                         "top_positions", "top_contexts", "pair_keys", "pair_counts")}

    def merge(self, state: dict) -> None:
        """Add another rank's statistics (disjoint windows of the same run)."""
        self._compact()
        self.tokens += state["tokens"]
        self.fired += state["fired"]
        self.act_sum += state["act_sum"]
        self.act_max = torch.maximum(self.act_max, state["act_max"])
        self._keep_top(torch.cat([self.top_values, state["top_values"]], 1),
                       torch.cat([self.top_positions, state["top_positions"]], 1),
                       torch.cat([self.top_contexts, state["top_contexts"]], 1))
        self._pending.append((state["pair_keys"], state["pair_counts"]))
        self._compact()

    # ---------------------------------------------------------------------------------------------- results
    def top_tokens(self, count: int) -> Dict[int, List[tuple]]:
        """{latent: [(token id, count), ...]} of the `count` most frequent tokens of each latent that fired."""
        self._compact()
        keys, counts = self.pair_keys.numpy(), self.pair_counts.numpy()
        latents, token_ids = keys // self.vocab_size, keys % self.vocab_size
        order = numpy.lexsort((token_ids, -counts, latents))  # by latent, then count descending, then id
        out: Dict[int, List[tuple]] = {}
        for i in order:
            entries = out.setdefault(int(latents[i]), [])
            if len(entries) < count:
                entries.append((int(token_ids[i]), int(counts[i])))
        return out


# -------------------------------------------------------------------------------------------------- text
_WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "↵"}


def shown_token(text: str) -> str:
    """A token as a description shows it: stripped, or its whitespace made visible when it is only whitespace."""
    stripped = text.strip()
    if stripped:
        return stripped
    return "".join(_WHITESPACE.get(ch, ch) for ch in text) or "∅"


def percent(fraction: float) -> str:
    """45%, 4.5%, 0.45%: two significant digits below 10%."""
    value = 100 * fraction
    return f"{value:.0f}%" if value >= 10 or value == 0 else f"{value:.2g}%"


def describe(top_tokens: Sequence[tuple], texts: Dict[int, str], fired: int, tokens: int) -> str:
    """The short description of a latent (module docstring)."""
    if fired == 0:
        return f"dead (no activation on {tokens:,} tokens)"
    shown = top_tokens[:DESCRIPTION_TOKENS]
    share = sum(count for _, count in shown) / fired
    words = " / ".join(shown_token(texts[token]) for token, _ in shown)
    if share < BROAD_SHARE:
        return f"{words} (broad: {percent(fired / tokens)} of tokens)"
    return f"{words} ({percent(share)})"


class WindowPieces:
    """Each window's tokens as decoded pieces (inspection.token_pieces: they join to the decoded window),
    computed once per window that a context comes from."""

    def __init__(self, windows: torch.Tensor, tokenizer) -> None:
        self.windows, self.tokenizer, self._cache = windows, tokenizer, {}

    def __call__(self, window: int) -> List[str]:
        if window not in self._cache:
            from megatron_cocomix.concepts.inspection import token_pieces

            self._cache[window] = token_pieces(self.tokenizer, self.windows[window].tolist())
        return self._cache[window]


def latent_records(stats: LatentStats, windows: torch.Tensor, tokenizer, top_tokens: int = 5) -> List[dict]:
    """One JSON-lines record per latent (module docstring) from the merged statistics of `windows` [n, s]."""
    pieces = WindowPieces(windows, tokenizer)
    tops = stats.top_tokens(top_tokens)
    ids = sorted({token for entries in tops.values() for token, _ in entries})
    texts = {token: tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
             for token in ids}
    s, width = stats.seq_length, stats.context
    records = []
    for c in range(stats.num_latents):
        fired = int(stats.fired[c])
        entries = tops.get(c, [])
        record = {"index": c, "description": describe(entries, texts, fired, stats.tokens), "dead": fired == 0,
                  "frequency": fired / stats.tokens if stats.tokens else 0.0, "fired": fired, "tokens": stats.tokens,
                  "mean_activation": float(stats.act_sum[c]) / fired if fired else None,
                  "max_activation": float(stats.act_max[c]) if fired else None,
                  "top_tokens": [{"id": token, "text": texts[token], "count": count, "share": count / fired}
                                 for token, count in entries],
                  "contexts": []}
        for value, position, around in zip(stats.top_values[c].tolist(), stats.top_positions[c].tolist(),
                                           stats.top_contexts[c]):
            if value <= 0:
                break
            window, p = divmod(position, s)
            first, last = max(0, p - width), min(s, p + width + 1)
            acts = around[first - p + width: last - p + width]
            record["contexts"].append({
                "activation": value, "window": window, "position": p, "highlight": p - first,
                "ids": windows[window, first:last].tolist(), "tokens": pieces(window)[first:last],
                "activations": [round(float(a), 6) for a in acts]})
        records.append(record)
    return records


def write_jsonl(records: Sequence[dict], path: str) -> None:
    """The records, one JSON object per line, written to a temporary name and renamed (never a torn file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ driver
@torch.no_grad()
def collect(teacher, sae, windows: torch.Tensor, batch_size: int, stats: LatentStats, rank: int = 0,
            world: int = 1, progress: Optional[Callable[[int], None]] = None) -> LatentStats:
    """This rank's statistics: windows w = rank, rank + world, ... of windows [n, s], `batch_size` per forward of
    the teacher (up to hidden_states[layer]) and the SAE; progress(tokens) after each batch."""
    mine = torch.arange(rank, windows.shape[0], world)
    for start in range(0, len(mine), batch_size):
        window_ids = mine[start:start + batch_size]
        batch = windows[window_ids]
        hidden = teacher.hidden(batch)
        values, indices = sae.encode(hidden.to(sae.dictionary.dtype))
        stats.update(batch, window_ids, values, indices)
        if progress is not None:
            progress(batch.numel())
    return stats
