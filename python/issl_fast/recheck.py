"""A store met again (resumed, appended to, or complete) is checked against the data by
featurising a few of its examples again: the ids a store keeps do not show a data set whose
examples were renumbered (new files sorted in among the old ones, as in a grown ``ImageFolder``)
or replaced, and features read back under the wrong ids would name the wrong examples silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .store import GradientStore, StoreError

# Stored examples featurised again by default (a few: one more small batch per featurize call).
RECHECK_ROWS = 4

# Largest ||phi - stored|| / max(||phi||, ||stored||) taken for the same example. Featurised again
# it differs by rounding only: the batch around it changes the order of sums and the store rounds
# to float16/bfloat16 (~1e-3 for a float32 encoder, a few 1e-2 for a bfloat16 one); another
# example differs by ~0.4-1.4 (a normalised influence of 0.9 already gives 0.45).
RECHECK_TOLERANCE = 0.2

# Rows far smaller than the sample's largest (an example whose loss is flat) are compared on the
# scale of that one: their relative difference is rounding noise.
NORM_FLOOR = 1e-3


@dataclass(frozen=True)
class Recheck:
    """Which stored examples to featurise again, and the comparison with their stored rows."""

    rows: int  # how many: evenly spread over the stored rows, the last one always among them
    # (x of those examples, their ids, their store rows) -> None; raises StoreError on a mismatch
    compare: Callable[[torch.Tensor, torch.Tensor, np.ndarray], None]

    def sample(self, done: int) -> np.ndarray:
        """The store rows to check among the first ``done``: the last is where examples sorted
        in among the old ones show first."""
        if done <= 0 or self.rows <= 0:
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.linspace(0, done - 1, min(self.rows, done)).round().astype(np.int64))


def store_recheck(store: GradientStore, featurize: Callable[[torch.Tensor, torch.Tensor],
                                                             torch.Tensor],
                  rows: int) -> Recheck | None:
    """A :class:`Recheck` of ``rows`` examples of ``store`` (None for 0) that compares their
    rows with ``featurize(x, ids)`` (features ``[B, dim]``). ``rows``: checked by the caller
    (featurize, before it makes a store)."""
    if rows == 0:
        return None

    def compare(x: torch.Tensor, ids: torch.Tensor, at: np.ndarray) -> None:
        phi = featurize(x, ids).detach().to("cpu", torch.float32)
        stored = torch.cat([store.load_to("cpu", torch.float32, rows=(int(r), int(r) + 1))
                            for r in at])
        norms = torch.maximum(phi.norm(dim=1), stored.norm(dim=1))
        scale = torch.clamp(norms, min=NORM_FLOOR * float(norms.max()))
        error = ((phi - stored).norm(dim=1) / scale).nan_to_num(0.0)  # (0/0: two zero rows)
        worst = int(error.argmax())
        if float(error[worst]) > RECHECK_TOLERANCE:
            raise StoreError(
                f"the data do not give the examples the store at {store.path} was made from: "
                f"example id {int(ids[worst])} (row {int(at[worst])}) featurised again differs "
                f"from its stored features by {float(error[worst]):.0%} (rounding gives under "
                f"{RECHECK_TOLERANCE:.0%}). The data changed (examples renumbered or replaced, "
                "e.g. new files sorted in among the old ones), or they do not give an example "
                "the same way twice (random transforms in the dataset: leave augmentation to "
                "the loss). Featurize these data into a new path, or pass recheck=0 to skip "
                "this check")

    return Recheck(rows, compare)
