"""Training and evaluating a TopK SAE on teacher activations (OpenAI recipe), data-parallel with torch.distributed.

Per step, on the step's batch of activations x [n, d] (xn = LN(x), all losses in the normalised space):

    pre    = W_enc (xn - pre_bias) + latent_bias                  [n, C]
    x_hat  = W_dec TopK_k(pre)+ + pre_bias                        [n, d]
    fvu    = sum ||xn - x_hat||^2 / sum ||xn - mean_n(xn)||^2      (MSE normalised by the batch variance)
    dead   = latents that fired for none of the last `dead_tokens` tokens
    e      = xn - x_hat (detached); e_hat = W_dec TopK_kaux(pre restricted to dead)+
    aux    = sum ||e - e_hat||^2 / sum ||e - mean_n(e)||^2         (AuxK: gives dead latents a gradient)
    loss   = fvu + aux_coef * aux                                  (aux_coef = 1/32)

Data parallel: the batch is the rows of every rank together. The denominators (and the means in them) are sums
over all ranks, taken by all-reduce, and depend on the data only; each rank's loss is its share, its own rows'
squared errors over those denominators, and the gradients are summed over ranks. So W ranks with n rows each
take exactly the step one process takes on the W x n rows (up to float rounding); the dead-latent counters add
every rank's tokens. The component of each decoder row's gradient along the row is projected out, the gradient
norm is clipped, Adam steps, and the rows are renormalised to unit norm. pre_bias starts at the geometric median
of a sample of xn (Weiszfeld iterations). The learning rate default scales as 1/sqrt(C) (2e-4 at C = 2^14).

Evaluation (`evaluate_sae`) reports, in the teacher's own scale: FVU of x vs decode(encode(x)), L0 (mean active
latents per token), the fraction of latents that never fired, and delta LM loss = mean CE with the SAE
reconstruction spliced in at the hook minus the clean mean CE.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .sae import TopKSAE
from .teacher import Teacher


def default_lr(num_latents: int) -> float:
    return 2e-4 / math.sqrt(num_latents / 2 ** 14)


def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: argmin_m sum_i ||points_i - m|| for points [n, d]."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * median.norm().clamp_min(1e-8):
            return new
        median = new
    return median


@torch.no_grad()
def centred_sum_of_squares(x: torch.Tensor, distributed: bool = False) -> torch.Tensor:
    """sum_i ||x_i - mean(x)||^2 over the rows x [n, d] (of every rank, the mean over all of them, when
    `distributed`), summed in float64; a scalar in x's dtype, the same on every rank."""
    stats = torch.cat([x.double().sum(0), x.new_tensor([x.shape[0]], dtype=torch.float64)])
    if distributed:
        dist.all_reduce(stats)
    total = (x.double() - stats[:-1] / stats[-1].clamp_min(1)).square().sum()
    if distributed:
        dist.all_reduce(total)
    return total.to(x.dtype)


def _fvu_share(target: torch.Tensor, recon: torch.Tensor, distributed: bool) -> torch.Tensor:
    """This rank's share of the FVU of the rows of every rank: its squared error over the common denominator."""
    return (target - recon).square().sum() / centred_sum_of_squares(target, distributed).clamp_min(1e-12)


class SAETrainer:
    """One rank's trainer; `step` is collective when torch.distributed is initialised (all ranks call it)."""

    def __init__(self, sae: TopKSAE, lr: Optional[float] = None, k_aux: Optional[int] = None,
                 aux_coef: float = 1 / 32, dead_tokens: int = 10_000_000, adam_eps: float = 6.25e-10,
                 clip_grad: float = 1.0) -> None:
        self.sae = sae
        self.lr = lr if lr is not None else default_lr(sae.num_latents)
        self.k_aux = min(k_aux if k_aux is not None else sae.d_model // 2, sae.num_latents)
        self.aux_coef, self.dead_tokens, self.clip_grad = aux_coef, dead_tokens, clip_grad
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=self.lr, eps=adam_eps)
        device = sae.dictionary.device
        self.tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
        self.step_count = 0
        self.distributed = dist.is_available() and dist.is_initialized()

    @torch.no_grad()
    def init_pre_bias(self, sample: torch.Tensor) -> None:
        """pre_bias <- geometric median of LN(sample) (sample [n, d]); the same value on every rank."""
        xn, _, _ = self.sae.normalize(sample.to(self.sae.pre_bias))
        median = geometric_median(xn)
        if self.distributed:
            dist.broadcast(median, src=0)
        self.sae.pre_bias.copy_(median)

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        sae = self.sae
        xn, _, _ = sae.normalize(x.to(sae.pre_bias))
        pre = sae.preactivation(xn)
        top_pre, indices = pre.topk(sae.k, dim=-1)
        values = F.relu(top_pre)
        recon = sae.decode_normalized(values, indices)
        fvu = _fvu_share(xn, recon, self.distributed)
        dead = self.dead_mask()
        num_dead = int(dead.sum())
        aux = torch.zeros((), device=x.device)
        if num_dead > 0:
            residual = (xn - recon).detach()
            aux_pre = pre.masked_fill(~dead, float("-inf"))
            aux_top, aux_idx = aux_pre.topk(min(self.k_aux, num_dead), dim=-1)
            aux_recon = F.embedding_bag(aux_idx, sae.dictionary, per_sample_weights=F.relu(aux_top), mode="sum")
            aux = torch.nan_to_num(_fvu_share(residual, aux_recon, self.distributed), nan=0.0)
        return {"loss": fvu + self.aux_coef * aux, "fvu": fvu, "aux": aux, "indices": indices, "values": values}

    def _all_reduce_grads(self) -> None:
        """Sum of the ranks' gradients: the gradient of the whole batch's loss (each rank's loss is its share)."""
        for param in self.sae.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)

    @torch.no_grad()
    def _project_decoder_grad(self) -> None:
        rows, grad = self.sae.dictionary, self.sae.dictionary.grad
        if grad is not None:
            grad.sub_((grad * rows).sum(-1, keepdim=True) * rows)

    def step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimizer step on this rank's activations x [n, d]; returns the metrics of the whole batch."""
        self.optimizer.zero_grad(set_to_none=True)
        out = self.losses(x)
        out["loss"].backward()
        if self.distributed:
            self._all_reduce_grads()
        self._project_decoder_grad()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.sae.parameters(),
                                                   self.clip_grad if self.clip_grad > 0 else float("inf"))
        self.optimizer.step()
        self.sae.normalize_dictionary_()
        with torch.no_grad():
            fired = torch.zeros(self.sae.num_latents, dtype=torch.long, device=x.device)
            fired.scatter_add_(0, out["indices"][out["values"] > 0], torch.ones_like(out["indices"][out["values"] > 0]))
            tokens = torch.tensor(x.shape[0], device=x.device)
            # The loss terms are this rank's shares: their sum over the ranks is the batch's value.
            metrics = torch.stack([out["loss"].detach(), out["fvu"].detach(), out["aux"].detach(),
                                   (out["values"] > 0).sum().float()])
            if self.distributed:
                dist.all_reduce(fired)
                dist.all_reduce(tokens)
                dist.all_reduce(metrics)
            self.tokens_since_fired += tokens
            self.tokens_since_fired[fired > 0] = 0
        self.step_count += 1
        loss, fvu, aux, active = metrics.tolist()
        return {"loss": loss, "fvu": fvu, "aux_loss": aux, "l0": active / int(tokens), "grad_norm": float(grad_norm),
                "dead_fraction": float(self.dead_mask().float().mean()), "lr": self.lr}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "tokens_since_fired": self.tokens_since_fired.cpu(),
                "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.step_count = int(state["step"])


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, teacher: Optional[Teacher], token_batches: Iterable[torch.Tensor],
                 skip_positions: int = 0) -> dict[str, float]:
    """FVU, L0, dead fraction and (with a teacher) delta LM loss over token batches [b, t] (see module docstring).

    Without a teacher, the batches are activations [n, d] and delta LM loss is not reported.
    """
    err = sum_x = sum_x2 = None
    tokens = 0
    l0 = 0.0
    fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=sae.dictionary.device)
    clean = spliced = 0.0
    sequences = 0
    for batch in token_batches:
        if teacher is not None:
            x = teacher.hidden(batch)[:, skip_positions:].reshape(-1, teacher.d_model).to(sae.dictionary)
            clean += float(teacher.sequence_losses(batch).sum())
            spliced += float(teacher.sequence_losses(batch, replace=lambda h: sae(h.to(sae.dictionary)).to(h)).sum())
            sequences += batch.shape[0]
        else:
            x = batch.to(sae.dictionary)
        code = sae.encode_with_stats(x)
        recon = sae.decode(code.values, code.indices, code.mu, code.std)
        e = (x - recon).double().square().sum()
        err = e if err is None else err + e
        sum_x = x.double().sum(0) if sum_x is None else sum_x + x.double().sum(0)
        s2 = x.double().square().sum()
        sum_x2 = s2 if sum_x2 is None else sum_x2 + s2
        tokens += x.shape[0]
        active = code.values > 0
        l0 += float(active.sum())
        fired[code.indices[active]] = True
    if tokens == 0:
        raise ValueError("evaluate_sae: no tokens to evaluate")
    variance = sum_x2 - sum_x.square().sum() / tokens  # sum ||x - mean(x)||^2
    result = {"fvu": float(err / variance), "l0": l0 / tokens, "dead_fraction": float((~fired).float().mean()),
              "tokens": tokens}
    if teacher is not None:
        result.update(clean_loss=clean / sequences, spliced_loss=spliced / sequences,
                      delta_lm_loss=(spliced - clean) / sequences)
    return result


class TokenWindows:
    """Token windows [seq_length] cut from a megatron .bin/.idx dataset: documents concatenated in file order
    and split into consecutive windows (no padding, the tail that does not fill a window is dropped)."""

    def __init__(self, prefix: str, seq_length: int) -> None:
        import os

        import numpy
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        for suffix in (".bin", ".idx"):
            if not os.path.exists(prefix + suffix):
                raise FileNotFoundError(f"--data-path {prefix}: no such file {prefix + suffix}")
        dataset = IndexedDataset(prefix)
        lengths = numpy.asarray(dataset.sequence_lengths, dtype=numpy.int64)
        if lengths.sum() < seq_length:
            raise ValueError(f"--data-path {prefix}: {int(lengths.sum())} tokens, fewer than one window of "
                             f"--seq-length {seq_length}")
        # Documents are contiguous in the .bin file, so the concatenated stream is one memory-mapped array.
        first, count = int(dataset.index.sequence_pointers[0]), int(lengths.sum())
        self.tokens = numpy.memmap(prefix + ".bin", dtype=dataset.index.dtype, mode="r", offset=first, shape=(count,))
        self.seq_length = seq_length

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_length

    def batch(self, window_ids: "list[int]") -> torch.Tensor:
        """LongTensor [len(window_ids), seq_length]."""
        import numpy

        rows = [self.tokens[i * self.seq_length:(i + 1) * self.seq_length] for i in window_ids]
        return torch.from_numpy(numpy.stack(rows).astype(numpy.int64))
