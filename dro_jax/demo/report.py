"""The demo's report: results.json, a Markdown table, PNG plots."""
from __future__ import annotations

import json
import os
from typing import Any

from dro_jax.demo.pipeline import LABELS


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def markdown_table(results: dict[str, Any]) -> str:
    rows = ["| method | true thumbs-up rate | 95% CI | KL to reference | held-out DRO loss | implied-reward AUC | n |",
            "|---|---|---|---|---|---|---|"]
    for key, m in results["methods"].items():
        lo, hi = m["thumbs_up_ci95"]
        rows.append(f"| {LABELS.get(key, key)} | {m['thumbs_up_rate']:.1%} | [{lo:.1%}, {hi:.1%}] | "
                    f"{_fmt(m.get('kl_to_reference'), '.2f')} | {_fmt(m.get('heldout_dro_loss'))} | "
                    f"{_fmt(m.get('heldout_implied_reward_auc'))} | {m['n_eval']} |")
    out = "\n".join(rows)
    if len(results.get("rounds", [])) > 1:
        out += "\n\nIterated DRO-V (each round: a fresh log from the previous policy, which is also its reference)\n\n"
        out += "| round | log thumbs-up (true) | thumbs-up rate | 95% CI | KL to SFT reference |\n|---|---|---|---|---|\n"
        out += "\n".join(f"| {r['round']} | {r['log_true_thumbs_up']:.1%} | {r['thumbs_up_rate']:.1%} | "
                         f"[{r['thumbs_up_ci95'][0]:.1%}, {r['thumbs_up_ci95'][1]:.1%}] | "
                         f"{r['kl_to_reference']:.2f} |" for r in results["rounds"])
    return out


def plots(results: dict[str, Any], out_dir: str) -> list[str]:
    """thumbs_up_over_steps.png and thumbs_up_vs_kl.png (none, with a note, without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[demo] matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    colours = {"dro_v": "tab:blue", "kto": "tab:orange", "filtered_sft": "tab:green", "reference": "black"}
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in results["curves"].items():
        steps = [c["step"] for c in curve]
        rate = [c["thumbs_up_rate"] for c in curve]
        lo = [c["thumbs_up_ci95"][0] for c in curve]
        hi = [c["thumbs_up_ci95"][1] for c in curve]
        ax.plot(steps, rate, marker="o", label=LABELS[method], color=colours.get(method))
        ax.fill_between(steps, lo, hi, alpha=0.15, color=colours.get(method))
    ref = results["methods"]["reference"]["thumbs_up_rate"]
    ax.axhline(ref, color="black", linestyle="--", linewidth=1, label=LABELS["reference"])
    paths.append(_finish(fig, ax, out_dir, "thumbs_up_over_steps.png", "training step on the feedback log",
                         "true thumbs-up rate (held-out prompts)", "Thumbs-up rate over training (95% Wilson band)"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in results["curves"].items():
        ax.plot([c["kl_to_reference"] for c in curve], [c["thumbs_up_rate"] for c in curve], marker="o",
                label=LABELS[method], color=colours.get(method))
    ax.scatter([0.0], [ref], color="black", zorder=5, label=LABELS["reference"])
    rounds = results.get("rounds", [])
    if len(rounds) > 1:
        ax.plot([r["kl_to_reference"] for r in rounds], [r["thumbs_up_rate"] for r in rounds], marker="s",
                linestyle=":", color="tab:purple", label="iterated DRO-V (rounds)")
    paths.append(_finish(fig, ax, out_dir, "thumbs_up_vs_kl.png", "KL(policy || reference), nats (sample estimate)",
                         "true thumbs-up rate", "Thumbs-up rate against KL to the reference"))
    return paths


def _finish(fig, ax, out_dir: str, name: str, xlabel: str, ylabel: str, title: str) -> str:
    """Labels a thumbs-up-rate plot, saves it as out_dir/name and returns the path."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(results: dict[str, Any], out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    files = {"results": os.path.join(out_dir, "results.json"), "table": os.path.join(out_dir, "results.md")}
    table = markdown_table(results)
    results["plots"] = [os.path.basename(p) for p in plots(results, out_dir)]
    with open(files["results"], "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    cfg = results.get("config", {})
    with open(files["table"], "w") as f:
        f.write(f"# dro_jax demo\n\n{table}\n\n"
                f"Held-out prompts: {results['methods']['reference']['n_eval']}; feedback log: "
                f"{results['log']['n']} responses sampled from the reference "
                f"({results['log']['true_thumbs_up']:.1%} truly thumbs-up, label noise "
                f"{cfg.get('label_noise', 0):.0%}); {cfg.get('steps')} steps per method; "
                f"wall time {results.get('wall_time_s', 0):.0f}s.\n")
        for p in results["plots"]:
            f.write(f"\n![{p}]({p})\n")
    return {**files, **{p: os.path.join(out_dir, p) for p in results["plots"]}}
