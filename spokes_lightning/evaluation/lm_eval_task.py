"""lm-eval task class with OLMES's PMI unconditional context.

OLMES (Gu et al., 2024, Sec. 3.3) normalizes ARC-Challenge, CommonsenseQA and OpenBookQA
by pointwise mutual information, ln P(a | c) - ln P(a | "Answer:"). lm-eval's
``acc_mutual_info`` computes the same difference but requests the unconditional term with
an empty context (scored after the BOS/EOS prefix token). This one-method subclass only
rewrites those unconditional requests' context to ``"Answer:"``; everything else
(request order, ``process_results``, aggregation) is stock lm-eval.
"""
from __future__ import annotations

from spokes_lightning.utils.errors import require_package
from spokes_lightning.evaluation.cloze import PMI_UNCONDITIONED_CONTEXT

require_package("lm_eval", "lm-eval")
from lm_eval.api.task import ConfigurableTask  # noqa: E402


class OlmesClozeTask(ConfigurableTask):
    """``ConfigurableTask`` whose PMI requests condition on ``"Answer:"`` instead of ``""``."""

    def construct_requests(self, doc, ctx, **kwargs):
        requests = super().construct_requests(doc, ctx, **kwargs)
        if self.OUTPUT_TYPE != "multiple_choice" or "acc_mutual_info" not in self._metric_fn_list:
            return requests
        n_choices = len(self.doc_to_choice(doc))
        for request in requests[n_choices:]:
            context, continuation = request.arguments[0], request.arguments[1]
            assert context == "", "lm-eval changed how it builds unconditional PMI requests"
            request.arguments = (PMI_UNCONDITIONED_CONTEXT, continuation, *request.arguments[2:])
        return requests
