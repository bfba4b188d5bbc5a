"""Beam search bookkeeping, step for step the reference's (transformers 5.x ``_beam_search``).

Pure tensor logic over per-row beams; the engine runs the model. Per step, for B rows and
K beams with C = max(2, 1 + number of eos ids) * K candidates:

1. add each live beam's summed log-prob to its next-token log-probs, take the C best of
   all K * V continuations (best first);
2. a candidate *ends* when its token is an eos id, a stop string matched, or it reached
   its row's limit (``max_new_tokens``, or fewer where the model's positions run out);
3. the K best candidates that did not end are the live beams of the next step;
4. candidates that ended and rank among the first K are scored
   ``sum_logprobs / new_tokens ** length_penalty`` and merged into the K finished
   hypotheses, best first (pushed down by -1e9 when the row is full under
   ``early_stopping=True`` or can no longer improve);
5. a row can no longer improve when its best live beam, scored at the current length
   (at its limit for ``early_stopping="never"`` with ``length_penalty > 0``),
   cannot beat its worst finished hypothesis.

The search stops when no row can improve, when every slot is finished and
``early_stopping is True``, or when every candidate ended. Scores use the reference's
float32 arithmetic, including its -1e9 sentinels, in the same order, so ties break alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from blipserve.engine.params import EarlyStopping

SENTINEL = -1.0e9  # the reference's "impossible" score


class Hypothesis(NamedTuple):
    token_ids: list[int]  # new tokens only, eos included when produced
    ended: bool  # True: ended by an eos id or a stop string; False: ran out of tokens


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick slots along dim 1: (B, S, ...) with (B, K) indices -> (B, K, ...)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


@dataclass
class BeamSearch:
    num_beams: int
    max_new_tokens: int  # the longest any row may grow (the token buffers' size)
    row_limits: torch.Tensor  # (B, 1) new tokens each row may have, <= max_new_tokens
    limit_scale: torch.Tensor  # (B, 1) float32 row_limits ** length_penalty
    length_penalty: float
    early_stopping: EarlyStopping
    eos_token_ids: torch.Tensor  # (E,)
    running_tokens: torch.Tensor  # (B, K, M) new tokens of the live beams
    running_scores: torch.Tensor  # (B, K) summed log-probs, best first
    done_tokens: torch.Tensor  # (B, K, M) finished hypotheses, best first
    done_scores: torch.Tensor  # (B, K) length-penalised scores
    done_lengths: torch.Tensor  # (B, K) new tokens in each hypothesis
    done_by_stop: torch.Tensor  # (B, K) bool: a stop string ended it
    is_done: torch.Tensor  # (B, K) bool: the slot holds a finished hypothesis
    can_improve: torch.Tensor  # (B, 1) bool
    step: int = 0
    finished: bool = False

    @classmethod
    def start(
        cls,
        batch_size: int,
        num_beams: int,
        max_new_tokens: int,
        length_penalty: float,
        early_stopping: EarlyStopping,
        eos_token_ids: list[int],
        device: torch.device,
        row_limits: list[int] | None = None,
    ) -> BeamSearch:
        """``row_limits``: per row, fewer new tokens than ``max_new_tokens`` (None: none)."""
        shape, tokens = (batch_size, num_beams), (batch_size, num_beams, max_new_tokens)
        limits = row_limits or [max_new_tokens] * batch_size
        assert len(limits) == batch_size and max(limits) <= max_new_tokens
        running_scores = torch.zeros(shape, device=device)
        running_scores[:, 1:] = SENTINEL  # only beam 0 is real at first: no duplicate beams
        return cls(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            row_limits=torch.tensor(limits, device=device)[:, None],
            # Python's float power, as the reference divides by ``max_length ** penalty``.
            limit_scale=torch.tensor([[n**length_penalty] for n in limits], device=device),
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            eos_token_ids=torch.tensor(eos_token_ids, dtype=torch.long, device=device),
            running_tokens=torch.zeros(tokens, dtype=torch.long, device=device),
            running_scores=running_scores,
            done_tokens=torch.zeros(tokens, dtype=torch.long, device=device),
            done_scores=torch.full(shape, SENTINEL, device=device),
            done_lengths=torch.zeros(shape, dtype=torch.long, device=device),
            done_by_stop=torch.zeros(shape, dtype=torch.bool, device=device),
            is_done=torch.zeros(shape, dtype=torch.bool, device=device),
            can_improve=torch.ones((batch_size, 1), dtype=torch.bool, device=device),
        )

    @property
    def num_candidates(self) -> int:
        return max(2, 1 + self.eos_token_ids.numel()) * self.num_beams

    def last_tokens(self) -> torch.Tensor:
        """(B * K,) the token each live beam just took: the next decode step's input."""
        return self.running_tokens[:, :, self.step - 1].reshape(-1)

    def advance(
        self,
        log_probs: torch.Tensor,
        stop_checker: Callable[[int, list[int]], bool] | None = None,
    ) -> torch.Tensor:
        """One step from processed (B * K, V) log-probs; returns the (B * K,) parent rows.

        Row ``i`` of the next step continues old row ``parent[i]``: reorder the KV cache and
        any per-row state with it.
        """
        b, k = self.running_scores.shape
        t, vocab = self.step, log_probs.shape[-1]
        totals = log_probs.view(b, k, vocab) + self.running_scores[:, :, None]
        cand_scores, flat = torch.topk(totals.view(b, k * vocab), self.num_candidates)  # (B, C)
        cand_beam, cand_token = flat // vocab, flat % vocab
        cand_tokens = _take(self.running_tokens, cand_beam)  # (B, C, M)
        cand_tokens[:, :, t] = cand_token

        stopped = self._stop_hits(cand_tokens[:, :, : t + 1], stop_checker)  # (B, C)
        ends = torch.isin(cand_token, self.eos_token_ids) | stopped
        ends = ends | (t + 1 >= self.row_limits)  # (B, C): a row at its limit ends all

        live_scores = cand_scores + ends.to(torch.float32) * SENTINEL
        keep = torch.topk(live_scores, k).indices  # (B, K)
        self.running_tokens = _take(cand_tokens, keep)
        self.running_scores = _take(live_scores, keep)
        parent = _take(cand_beam, keep)

        self._collect_finished(cand_tokens, cand_scores, ends, stopped)
        self.step += 1
        self._update_can_improve()
        self.finished = not (
            bool(self.can_improve.any())
            and not (bool(self.is_done.all()) and self.early_stopping is True)
            and not bool(ends.all())
        )
        rows = torch.arange(b, device=parent.device)[:, None] * k
        return (parent + rows).reshape(-1)

    def hypotheses(self, num_return_sequences: int) -> list[list[Hypothesis]]:
        """Per row, the ``num_return_sequences`` best finished hypotheses, best first."""
        n = num_return_sequences
        tokens = self.done_tokens[:, :n].tolist()
        lengths = self.done_lengths[:, :n].tolist()
        by_stop = self.done_by_stop[:, :n].tolist()
        eos = set(self.eos_token_ids.tolist())
        out = []
        for row_tokens, row_lengths, row_stop in zip(tokens, lengths, by_stop, strict=True):
            row = []
            for ids, length, stop in zip(row_tokens, row_lengths, row_stop, strict=True):
                ids = ids[:length]
                row.append(Hypothesis(ids, stop or (bool(ids) and ids[-1] in eos)))
            out.append(row)
        return out

    def _stop_hits(
        self, tokens: torch.Tensor, stop_checker: Callable[[int, list[int]], bool] | None
    ) -> torch.Tensor:
        """(B, C, t) candidate tokens -> (B, C) bool: the caller's stop check matched."""
        hits = torch.zeros(tokens.shape[:2], dtype=torch.bool)
        if stop_checker is not None:
            for row, candidates in enumerate(tokens.tolist()):
                for c, ids in enumerate(candidates):
                    hits[row, c] = stop_checker(row, ids)
        return hits.to(tokens.device)

    def _collect_finished(
        self,
        cand_tokens: torch.Tensor,
        cand_scores: torch.Tensor,
        ends: torch.Tensor,
        stopped: torch.Tensor,
    ) -> None:
        """Merge the candidates that just ended (top K only) into the finished hypotheses."""
        k = self.num_beams
        in_top_k = torch.arange(ends.shape[1], device=ends.device) < k
        just_done = ends & in_top_k[None, :]
        scores = cand_scores / ((self.step + 1) ** self.length_penalty)
        row_full = self.is_done.all(dim=-1, keepdim=True) & (self.early_stopping is True)
        scores = scores + row_full.to(torch.float32) * SENTINEL
        scores = scores + (~self.can_improve).to(torch.float32) * SENTINEL
        scores = scores + (~just_done).to(torch.float32) * SENTINEL

        lengths = torch.full_like(self.done_lengths[:, :1], self.step + 1).expand_as(cand_scores)
        merged_scores = torch.cat([self.done_scores, scores], dim=1)  # (B, K + C)
        best = torch.topk(merged_scores, k).indices  # (B, K)
        self.done_scores = _take(merged_scores, best)
        self.done_tokens = _take(torch.cat([self.done_tokens, cand_tokens], dim=1), best)
        self.done_lengths = _take(torch.cat([self.done_lengths, lengths], dim=1), best)
        self.done_by_stop = _take(torch.cat([self.done_by_stop, stopped & just_done], dim=1), best)
        self.is_done = _take(torch.cat([self.is_done, just_done], dim=1), best)

    def _update_can_improve(self) -> None:
        """Can the best live beam still beat the worst finished hypothesis of its row?"""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_running = self.running_scores[:, :1] / self.limit_scale
        else:
            best_running = self.running_scores[:, :1] / (self.step**self.length_penalty)
        worst_done = self.done_scores.min(dim=1, keepdim=True).values
        worst_done = torch.where(self.is_done, worst_done, SENTINEL)  # (B, K)
        beats = (best_running > worst_done).any(dim=-1, keepdim=True)
        self.can_improve = self.can_improve & beats
