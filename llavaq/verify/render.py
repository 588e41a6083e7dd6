"""``llavaq verify``'s tables (rich), as the command prints them."""

from __future__ import annotations

from typing import Any

from llavaq.verify.metrics import FidelityReport


def print_report(report: FidelityReport, console: Any) -> None:
    from rich.table import Table

    acts = "float activations (weight-only reference)" if report.mode == "weight_only" \
        else f"{report.mode} int8 activations"
    t = Table(title=f"llavaq verify: {report.quantized} ({report.format}, {acts}, "
                    f"{report.quantized_linears} W8A8 Linears emulated)")
    for c in ("prompt", "answer (FP, greedy)", "cosine", "top-1 answer", "top-1 all", "KL(FP‖Q)"):
        t.add_column(c, overflow="fold")
    for r in report.prompts:
        label = (f"[{r.image}] " if r.image else "[text] ") + r.prompt
        t.add_row(label[:60], r.answer[:50], f"{r.cosine:.5f}", f"{r.top1:.3f}", f"{r.top1_all:.3f}", f"{r.kl:.5f}")
    if report.prompts:
        console.print(t)
    s = Table(title="overall", show_header=False)
    if report.ppl_fp is not None:
        s.add_row("perplexity FP → Q", f"{report.ppl_fp:.4f} → {report.ppl_q:.4f} ({report.ppl_increase:+.2f}%) "
                                       f"on {report.text_tokens} held-out tokens")
        s.add_row("held-out text top-1 / KL", f"{report.text_top1:.4f} / {report.text_kl:.5f}")
    if report.image_top1 is not None:
        s.add_row("image-prompt answers top-1 / KL", f"{report.image_top1:.4f} / {report.image_kl:.5f} "
                                                    f"({report.image_positions} positions)")
    if report.text_prompt_top1 is not None:
        s.add_row("text-prompt answers top-1 / KL", f"{report.text_prompt_top1:.4f} / {report.text_prompt_kl:.5f} "
                                                   f"({report.text_prompt_positions} positions)")
    s.add_row("top-1 agreement (all scored positions)", f"{report.top1:.4f}")
    s.add_row("KL(FP‖Q) per position", f"{report.kl:.5f}")
    s.add_row("mean logits cosine", f"{report.cosine:.5f}")
    s.add_row("time", f"{report.seconds:.1f}s")
    console.print(s)
    w = Table(title="worst quantized Linears (emulated output vs float Linear, same input)")
    for c in ("Linear", "rel. MSE", "MSE", "saturated"):
        w.add_column(c)
    for e in report.worst_layers:
        w.add_row(e.name, f"{e.rel_mse:.2e}", f"{e.mse:.2e}", f"{e.clip_fraction:.2e}")
    console.print(w)
    if report.range_drivers:
        console.print(report.range_drivers.get("summary", ""))
