"""What a build knows once its stages have run: the typed state the library is written from.

Each stage returns one of these parts (training/pipeline.py shows the order); `BuildState`
gathers them so the last stage (training/publish.py: manifest, report, files) takes one
object instead of a dozen positional arguments, and a reader sees in one place what a
library is made of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.clusters import Clustering, Split
from training.documents import Corpus
from training.expert_sets import ExpertSet, ExpertSets
from training.routing import RoutingEmbedding
from training.titles import Titles
from training.tune import SetChoice


@dataclass(frozen=True)
class BuildState:
    """Every stage's result, in stage order."""

    corpus: Corpus  # 1. the documents, cut to --max-tokens
    embeddings: np.ndarray  # 2. (n_docs, d) the clustering embedding
    clustering: Clustering  # 3. labels and holdout
    split: Split  # 3. each expert's training documents; tuning and test documents
    experts: ExpertSets  # 4. the trained expert set(s) and the multitask adapter
    titles: Titles  # 5. a title per expert
    routing: RoutingEmbedding  # 6. the routing embedding kept, and its centroids
    tuning: dict[str, dict[str, Any]]  # 7. per expert set, its tuning grid ({} --no-tune)
    choice: SetChoice  # 7. the expert set served, and why
    evaluation: dict[str, Any] | None  # 8. the quality table on the test documents

    @property
    def served(self) -> ExpertSet:
        """The expert set the library serves."""
        return self.experts.sets[self.choice.name]

    @property
    def tuned(self) -> dict[str, Any] | None:
        """The served set's tuning result (None when not tuned: the paper's defaults)."""
        return self.tuning.get(self.choice.name)
