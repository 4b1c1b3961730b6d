"""Megatron's pretraining batch sampler: a fixed global sample order, split among data-parallel ranks.

Global sample indices consumed_samples, consumed_samples + 1, ... are grouped into global micro-batches of
G = micro_batch_size x data_parallel_size consecutive indices; rank r takes positions [r x mbs, (r + 1) x mbs) of
each. After k micro-batches on every rank, consumed_samples + k x G samples have been used, which is exactly what
the training state records, so a resumed run starts at the next unseen sample. A trailing partial global
micro-batch is dropped so all ranks take the same number of steps. The order is the dataset's (megatron-core
shuffles inside GPTDataset/BlendedDataset with a fixed seed), so it is the same for any number of loader workers.
"""

from __future__ import annotations

from typing import Iterator, List


class PretrainingSampler:
    """Batch sampler yielding lists of micro_batch_size sample indices for one data-parallel rank."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int) -> None:
        if total_samples <= 0:
            raise ValueError(f"the dataset has no samples (total_samples={total_samples})")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError(f"micro_batch_size {micro_batch_size} and data_parallel_size {data_parallel_size} "
                             f"must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} is outside [0, {data_parallel_size})")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} is outside the dataset's {total_samples} samples: "
                             f"the run has used up its data (build the datasets for more samples)")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.global_micro_batch = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_micro_batch

    def __iter__(self) -> Iterator[List[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        for first in range(self.consumed_samples, self.total_samples - self.global_micro_batch + 1,
                           self.global_micro_batch):
            yield list(range(first + start, first + start + self.micro_batch_size))
