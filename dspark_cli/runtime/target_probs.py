"""The target's probabilities from an engine's logits, as a verification reads them, and, for
greedy requests, each row's argmax of the logits (the engine's greedy token, the runtime's
target_argmax). Two forms:
- logit_rows writes no probabilities: each row's max and 1 / Σ exp(x − max) (on CUDA one read of
  the logits, csrc/softmax_stats.cu), and the verification computes p = exp(x − max) · (1 / Σ)
  where it reads an entry (LogitRows). A verification reads one row per request and one entry per
  ratio test, so this spares writing and reading [N, V] fp32 (545 MB at 128 requests × 7 drafts ×
  Qwen3's 151,936 ids). vLLM V1's path on CUDA;
- softmax_rows writes the probabilities [N, V] (torch's softmax and argmax): V1's path on the CPU."""

from dataclasses import dataclass

import torch

from dspark_cli.runtime import _checks
from dspark_cli.runtime._dispatch import try_cuda


def softmax_rows(logits: torch.Tensor, probs: torch.Tensor, best: torch.Tensor | None = None) -> None:
    """probs[:N] = softmax(logits) over V for logits [N, V] fp32; best[:N] = the argmax of each
    logits row, when given (torch.argmax's: the first of equal maxima, NaN above every number).
    probs fp32 [≥ N, V] and best int64 [≥ N]: an engine's buffers with spare rows after N. Rows as
    torch gives them: a row with a NaN, or of −inf only, softmaxes to NaN."""
    _checks.tensor("logits", logits, 2, (torch.float32,))
    _checks.nonempty_vocabulary("logits", logits)
    _checks.tensor("probs", probs, 2, (torch.float32,))
    N, V = logits.shape
    if probs.shape[0] < N or probs.shape[1] != V:
        raise ValueError(f"probs has shape {tuple(probs.shape)}: at least the logits' {N} rows of {V} expected")
    if best is not None:
        _checks.tensor("best", best, 1, (torch.int64,))
        if best.shape[0] < N:
            raise ValueError(f"best has {best.shape[0]} entries: at least the logits' {N} rows expected")
    _checks.same_device(logits=logits, probs=probs, best=best)
    torch.softmax(logits, dim=-1, out=probs[:N])
    if best is not None:
        torch.argmax(logits, dim=-1, out=best[:N])


@dataclass(frozen=True)
class ProbRows:
    """Target rows as probabilities [N, V] fp32 behind LogitRows' interface, so that the
    verification (rejection.py) reads either form one way."""

    probs: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.probs.shape)

    @property
    def device(self) -> torch.device:
        return self.probs.device

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.probs,)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.probs[index]

    def entries(self, index: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.probs[index, ids]

    def argmax(self) -> torch.Tensor:
        return self.probs.argmax(dim=-1)

    def as_read(self, per_row: torch.Tensor) -> torch.Tensor:
        return per_row


@dataclass(frozen=True)
class LogitRows:
    """Target rows as an engine's logits with their softmax statistics, for the rejection_sample
    functions in place of a probability tensor: row i's probabilities are
    exp(logits[i] − stats[i, 0]) · stats[i, 1] (probs() computes them all; rows() and entries()
    those asked, as the torch reference does; the CUDA kernels the entries they read). logits
    [N, V] fp32, stats [N, 2] fp32 (logit_rows makes them).
    spare_rows: rows N .. N + spare_rows − 1 read as row N − 1 — an engine's rows past its logits
    whose draws it replaces (vLLM V1 gives the bonus token itself: the last request's bonus row is
    one past its logits)."""

    logits: torch.Tensor
    stats: torch.Tensor
    spare_rows: int = 0

    def __post_init__(self):
        _checks.tensor("logits", self.logits, 2, (torch.float32,))
        _checks.tensor("stats", self.stats, 2, (torch.float32,))
        _checks.nonempty_batch("logits", self.logits)
        _checks.nonempty_vocabulary("logits", self.logits)
        if self.stats.shape != (self.logits.shape[0], 2):
            raise ValueError(f"stats has shape {tuple(self.stats.shape)}: ({self.logits.shape[0]}, 2) expected, "
                             f"the max and 1 / Σ exp(x − max) of each logits row")
        if not _checks.integer(self.spare_rows) or self.spare_rows < 0:
            raise ValueError(f"spare_rows must be an integer ≥ 0, got {self.spare_rows!r}")
        _checks.same_device(logits=self.logits, stats=self.stats)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows as a verification reads them, V)."""
        return self.logits.shape[0] + self.spare_rows, self.logits.shape[1]

    @property
    def device(self) -> torch.device:
        return self.logits.device

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.logits, self.stats

    def probs(self) -> torch.Tensor:
        """The probabilities [N + spare_rows, V] fp32, as the CUDA verification computes each entry."""
        return self.rows(torch.arange(self.shape[0], device=self.device))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The probabilities of the rows `index` (any shape, int64) → [*index.shape, V]."""
        i = self._logit_row(index)
        return torch.exp(self.logits[i] - self.stats[i, :1]) * self.stats[i, 1:]

    def entries(self, index: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The probabilities at (row index, token id) pairs of one shape."""
        i = self._logit_row(index)
        return torch.exp(self.logits[i, ids] - self.stats[i, 0]) * self.stats[i, 1]

    def argmax(self) -> torch.Tensor:
        """Each row's argmax of the logits (an engine's greedy token), spare rows included."""
        return self.as_read(self.logits.argmax(dim=-1))

    def as_read(self, per_row: torch.Tensor) -> torch.Tensor:
        """A value per logits row (or per target row: a spare row's own is not read) → one per
        target row, each row's logits row's: a spare row takes row N − 1's, as it reads its entries
        (an engine's greedy tokens given as target_argmax, as the CUDA op reads them)."""
        return per_row[self._logit_row(torch.arange(self.shape[0], device=self.device))]

    def _logit_row(self, index: torch.Tensor) -> torch.Tensor:
        """The logits row each target row reads: its own, or for a spare row the last."""
        return index.clamp(max=self.logits.shape[0] - 1)


def logit_rows(logits: torch.Tensor, best: torch.Tensor | None = None, spare_rows: int = 0) -> LogitRows:
    """The target rows of logits [N, V] fp32 for a verification, without writing probabilities:
    each row's max and 1 / Σ exp(x − max) (torch's softmax rows are exp(x − max) / Σ: the same up to
    the rounding of the sum, which torch's CPU kernel and ours order differently). best[:N] = each
    row's argmax, when given (as softmax_rows'). A row with a NaN, or of −inf only, gives NaN
    probabilities. spare_rows: see LogitRows."""
    _checks.tensor("logits", logits, 2, (torch.float32,))
    _checks.nonempty_vocabulary("logits", logits)
    N = logits.shape[0]
    if best is not None:
        _checks.tensor("best", best, 1, (torch.int64,))
        if best.shape[0] < N:
            raise ValueError(f"best has {best.shape[0]} entries: at least the logits' {N} rows expected")
    _checks.same_device(logits=logits, best=best)
    stats = torch.empty(N, 2, dtype=torch.float32, device=logits.device)
    if try_cuda("softmax_stats", [logits], logits, stats, best) is NotImplemented:
        row_max = logits.amax(dim=-1, keepdim=True)
        stats[:, :1] = row_max
        stats[:, 1:] = torch.exp(logits - row_max).sum(dim=-1, keepdim=True).reciprocal()
        if best is not None:
            torch.argmax(logits, dim=-1, out=best[:N])
    return LogitRows(logits, stats, spare_rows)
