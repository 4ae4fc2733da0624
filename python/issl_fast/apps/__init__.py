"""Applications on a fitted store: duplicates, outliers, group (fairness) influence."""

from .clustered import ClusteredIndex, ClusteredSearch
from .duplicates import (
    DuplicatePairs,
    clustered_index,
    find_duplicates,
    merge_neighbours,
    merge_rows,
    normalised_neighbours,
    transformed_neighbours,
)
from .fairness import GroupInfluence, group_influence
from .outliers import OutlierRanking, find_outliers, neighbour_scores
from .transforms import Shift, Translation, shifts, translations

__all__ = [
    "ClusteredIndex",
    "ClusteredSearch",
    "DuplicatePairs",
    "GroupInfluence",
    "OutlierRanking",
    "Shift",
    "Translation",
    "clustered_index",
    "find_duplicates",
    "find_outliers",
    "group_influence",
    "merge_neighbours",
    "merge_rows",
    "neighbour_scores",
    "normalised_neighbours",
    "transformed_neighbours",
    "shifts",
    "translations",
]
