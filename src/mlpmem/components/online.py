"""Where the memory's inputs come from when keys are not stored: the frozen LM run on the fly (online training).

Both input modes answer ``hidden(rows)`` for the same row space (rows ``[0, N)`` train positions, then the
validation positions): *online* runs the frozen base LM over the windows containing those rows and captures the
hook point (rounded through float16 by default, so it feeds bit-identical inputs to the offline mode's stored
keys). Online training shuffles whole windows rather than single rows, so each step runs the LM on only a couple
of windows.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from mlpmem.components.capture import forward_hidden
from mlpmem.components.data import plan_windows
from mlpmem.components.lm import LoadedLM
from mlpmem.components.trainer import BatchPlan


class OnlineSource:
    """Memory inputs computed on the fly by the frozen LM (no stored keys needed).

    streams: [(tokens, first_row)], each a token stream whose position t is row first_row + t. The hidden states
    of the most recent windows are cached, so consecutive batches that share a window run it once.
    """

    def __init__(self, lm: LoadedLM, hook, streams: list[tuple[np.ndarray, int]], context: int, stride: int,
                 round_fp16: bool = True, cache_windows: int = 16, batch_size: int = 8):
        self.lm, self.hook, self.round = lm, hook, round_fp16
        self.streams = []
        for tokens, first in streams:
            wins = plan_windows(len(tokens), context, stride)
            self.streams.append((tokens, first, wins, np.array([w.score_from for w in wins], dtype=np.int64)))
        self.firsts = np.array([s[1] for s in self.streams], dtype=np.int64)
        self.cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self.cache_windows = cache_windows
        self.batch_size = batch_size  # windows per LM forward

    def window_of(self, row: int) -> tuple[int, int]:
        """(stream, window index) of the window that scores this row."""
        s = int(np.searchsorted(self.firsts, row, side="right")) - 1
        t = row - self.firsts[s]
        return s, int(np.searchsorted(self.streams[s][3], t, side="right")) - 1

    def _forward(self, missing: list[tuple[int, int]]) -> None:
        """Run the LM on these windows (right-padded, like extraction) and cache their scored rows."""
        T = max(self.streams[s][2][w].end - self.streams[s][2][w].begin for s, w in missing)
        ids = torch.zeros((len(missing), T), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (s, w) in enumerate(missing):
            win = self.streams[s][2][w]
            ids[j, : win.end - win.begin] = torch.from_numpy(self.streams[s][0][win.begin:win.end].astype(np.int64))
            mask[j, : win.end - win.begin] = 1
        with torch.inference_mode():
            h = forward_hidden(self.lm.model, self.hook, ids.to(self.lm.device), mask.to(self.lm.device))
        for j, (s, w) in enumerate(missing):
            win = self.streams[s][2][w]
            rows = h[j, win.score_from - win.begin:win.end - win.begin]
            rows = rows.to(torch.float16) if self.round else rows
            self.cache[(s, w)] = rows.float().cpu()

    def hidden(self, positions: np.ndarray) -> torch.Tensor:
        keys = [self.window_of(int(r)) for r in positions]
        needed = list(dict.fromkeys(keys))
        missing = [k for k in needed if k not in self.cache]
        for i in range(0, len(missing), self.batch_size):
            self._forward(missing[i:i + self.batch_size])
        out = []
        for r, (s, w) in zip(positions, keys):
            t = int(r) - self.firsts[s]
            out.append(self.cache[(s, w)][t - self.streams[s][2][w].score_from])
        # Evict only after the lookups: a request may span more windows than the cache holds.
        for k in needed:
            self.cache.move_to_end(k)
        while len(self.cache) > self.cache_windows:
            self.cache.popitem(last=False)
        return torch.stack(out) if out else torch.zeros((0, self.lm.identity["hidden_size"]))


class WindowBatchPlan(BatchPlan):
    """Shuffles whole windows (their rows stay together and in order) instead of single rows: online training."""

    def __init__(self, train_rows: np.ndarray, window_sizes: list[int], batch_size: int, seed: int):
        super().__init__(train_rows, batch_size, seed)
        self.bounds = np.concatenate([[0], np.cumsum(window_sizes)])
        assert self.bounds[-1] == len(train_rows), (self.bounds[-1], len(train_rows))

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            order = np.random.default_rng(self.seed + epoch).permutation(len(self.bounds) - 1)
            perm = np.concatenate([np.arange(self.bounds[w], self.bounds[w + 1]) for w in order])
            self._perm = (epoch, perm)
        return self._perm[1]
