"""The one pass/fail rule (``verify --max_ppl_increase/--min_top1`` and ``--recipe auto``'s target)."""

from __future__ import annotations

import itertools

from llavaq.tuning import target_gaps
from llavaq.verify import FidelityReport, Miss, check_thresholds, target_misses


def _report(ppl_q: float | None, text_top1: float | None, image_top1: float | None, top1: float) -> FidelityReport:
    return FidelityReport(model_path="m", quantized="q", format="msmodelslim", mode="static", prompts=[],
                          ppl_fp=None if ppl_q is None else 10.0, ppl_q=ppl_q, text_tokens=0, text_top1=text_top1,
                          text_kl=None, text_cosine=None, top1=top1, kl=0.0, cosine=1.0, worst_layers=[],
                          quantized_linears=0, seconds=0.0, image_top1=image_top1)


def test_each_of_text_and_image_answers_must_hold_and_no_perplexity_fails():
    score = {"ppl_increase": 0.5, "text_top1": 0.97, "image_top1": 0.90, "top1": 0.99}
    assert target_misses(score, 1.0, 0.95) == [Miss("top1", "image-prompt answers", 0.90, 0.95)]
    assert target_misses({**score, "ppl_increase": None}, 1.0, None) == [Miss("perplexity", "held-out text", None,
                                                                                1.0)]
    # neither text nor image answers scored: the pooled top-1 decides
    assert target_misses({"ppl_increase": 0.5, "top1": 0.9}, 1.0, 0.95) == [Miss("top1", "all scored positions",
                                                                                 0.9, 0.95)]
    assert target_misses(score, None, None) == []


def test_verify_and_the_tuner_fail_the_same_checks():
    """Both messages come from the one rule: for every score, the same number of failed checks, same subjects."""
    for ppl_q, text, image, top1 in itertools.product((None, 10.05, 10.2), (None, 0.9, 0.99), (None, 0.9, 0.99),
                                                      (0.9, 0.99)):
        report = _report(ppl_q, text, image, top1)
        score = {"ppl_increase": report.ppl_increase, "text_top1": text, "image_top1": image, "top1": top1}
        verify_msgs = check_thresholds(report, 1.0, 0.95)
        tuner_msgs = target_gaps(score, 1.0, 0.95)
        assert len(verify_msgs) == len(tuner_msgs) == len(target_misses(score, 1.0, 0.95))
        for m, v, t in zip(target_misses(score, 1.0, 0.95), verify_msgs, tuner_msgs, strict=True):
            if m.check == "top1":
                assert m.what in v and m.what in t
            else:
                assert ("perplexity" in t) and ("perplexity" in v or "--max_ppl_increase" in v)
