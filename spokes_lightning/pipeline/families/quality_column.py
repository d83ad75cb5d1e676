"""Quality source ``column``: a score already in the data (``quality.column`` of each record)."""
from __future__ import annotations

import numpy as np

from spokes_lightning.pipeline.feature_registry import QualitySource, register


@register
class ColumnQuality(QualitySource):
    name = "quality_column"
    source = "column"
    computes = "quality from a numeric field of every record (FineWeb-Edu score, DCLM fastText score)"
    order = 300

    def scores(self, ctx, pool):
        from spokes_lightning.features.quality import quality_from_column

        return np.asarray(quality_from_column(pool, ctx.cfg.quality.column), dtype=np.float64), {}
