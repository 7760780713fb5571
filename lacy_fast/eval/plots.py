"""Plots people would rather see than read: training curves of one or more runs.

    lacy-fast plot runs/lacy runs/none [--out curves.png] [--smooth 20] [--x gt_tokens]

draws, per run, the loss, the loss on ground-truth targets, the loss on <CALL> targets,
the call rate, the learning rate and the gradient norm, from each run's ``metrics.jsonl``,
against the step or (``--x gt_tokens``) the ground-truth-gradient tokens seen, the axis
strategies are compared on (an equal-budget run stops every strategy at the same count).
Each run is labelled by its strategy (``objective.strategy`` of its ``config.json``) and
its folder.

``plot_budget_curve`` draws the demo's main plot: FactScore against the call budget, every
strategy, the seed spread as a band. ``plot_sweep`` draws the evaluation's FactScore vs call-rate curves (``lacy-fast eval
--sweep``, ``lacy_fast.eval.run.sweep``), one line per model. ``plot_regime`` draws the
demo's regime diagnostics: FactScore on frequent and rare people, alone and in cascade,
and where each SLM's calls land.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lacy_fast.config import Config, doc
from lacy_fast.errors import ConfigError, UserError
from lacy_fast.fileio import atomic_path
from lacy_fast.overrides import Shorthand, build_config, print_explain, shorthand_help, split_overrides

PANELS = [("loss", "loss"), ("loss_gt", "loss on ground-truth targets"), ("loss_call", "loss on <CALL> targets"),
          ("call_rate", "call rate (share of targets)"), ("lr", "learning rate"),
          ("grad_norm", "gradient norm (before clipping)")]
# x axis key -> its label
X_AXES = {"step": "step", "gt_tokens": "ground-truth-gradient tokens"}


@dataclass
class PlotConfig(Config):
    """The settings of `lacy-fast plot` (its flags are shorthands for these keys)."""

    x: str = doc("step", "x axis: the optimizer step, or the ground-truth-gradient tokens seen (the axis strategies "
                 "are compared on)", choices=tuple(X_AXES))
    smooth: int = doc(1, "trailing-mean window, in logged steps")

    def check(self) -> None:
        if self.smooth < 1:
            raise ConfigError("smooth", f"is {self.smooth}; it must be at least 1")


SHORTHANDS = [Shorthand("--x", "x"), Shorthand("--smooth", "smooth")]


def run_label(run: Path) -> str:
    """'lacy (runs/lacy)': the run's strategy from its config.json, and its folder."""
    folder = run if run.is_dir() else run.parent
    try:
        strategy = json.loads((folder / "config.json").read_text())["objective"]["strategy"]
    except (OSError, ValueError, KeyError, TypeError):
        return str(run)
    return f"{strategy} ({folder})"


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a training run's out_dir (it holds metrics.jsonl)")
    rows = []
    lines = path.read_bytes().splitlines()
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if n < len(lines):  # only a torn last line (a kill mid-write) is tolerated
                what = "UTF-8 text" if isinstance(err, UnicodeDecodeError) else "valid JSON"
                raise UserError(f"{path}:{n} is not {what}; the metrics file is damaged (delete that line to plot "
                                "the others)")
    if not rows:
        raise UserError(f"{path} holds no steps yet; plot it after the run has logged")
    return rows


def smooth(values: list[float | None], window: int) -> list[float | None]:
    """Trailing mean over ``window`` finite values (None stays None)."""
    out, buf = [], []
    for v in values:
        if v is None:
            out.append(None)
            continue
        buf.append(v)
        buf = buf[-window:]
        out.append(sum(buf) / len(buf))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _colors(names: list[str]) -> dict[str, str]:
    """One colour per name, the same in every panel (a panel may lack some names); past the
    default cycle's ten colours, tab20's twenty, so no two of up to twenty names share one."""
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(names) > len(cycle):
        cycle = [plt.get_cmap("tab20")(i) for i in range(20)]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    return out


def draw_runs(runs: dict[str, list[dict[str, Any]]], window: int = 1, x: str = "step"):
    """The figure of ``plot_runs``: one panel per PANELS entry, one line per run."""
    fig, axes = _pyplot().subplots(3, 2, figsize=(11, 9.5), sharex=True)
    colors = _colors(list(runs))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for name, rows in runs.items():
            kept = [r for r in rows if r.get(key) is not None and r.get(x) is not None]
            if kept:
                ax.plot([r[x] for r in kept], smooth([r[key] for r in kept], window), label=name, linewidth=1.4,
                        color=colors[name])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel(X_AXES[x])
    axes[0, 0].legend(fontsize=8)
    return fig


def plot_runs(runs: dict[str, list[dict[str, Any]]], out: Path, window: int = 1, x: str = "step") -> Path:
    return _save(draw_runs(runs, window, x), out)


def plot_sweep(curves: dict[str, list[dict[str, Any]]], out: Path) -> Path:
    """FactScore and supported facts per generation against the call rate, one line per curve.

    ``curves``: name -> the points of ``lacy_fast.eval.run.sweep`` (each with ``call_rate``,
    ``factscore``, ``supported_per_generation``). Points without a FactScore (no fact
    stated) are left out of the first panel.
    """
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4.2))
    colors = _colors(list(curves))
    for name, points in curves.items():
        points = sorted(points, key=lambda p: p["call_rate"])
        scored = [p for p in points if p["factscore"] is not None]
        axes[0].plot([p["call_rate"] for p in scored], [p["factscore"] for p in scored], marker="o", label=name,
                     linewidth=1.4, color=colors[name])
        axes[1].plot([p["call_rate"] for p in points], [p["supported_per_generation"] for p in points], marker="o",
                     label=name, linewidth=1.4, color=colors[name])
    for ax, title in zip(axes, ("FactScore (supported / stated)", "supported facts per generation")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("call rate (share of decoding steps that call)")
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    return _save(fig, out)


def plot_budget_curve(curves: dict[str, list[list[dict[str, Any]]]], out: Path) -> Path:
    """FactScore against the nominal call budget, one line per name (the mean over seeds) and
    the seed spread (± one standard deviation) as a band; beside it, the realised call rate
    against the budget (the diagonal: budgets met).

    ``curves``: name -> one list of ``sweep`` points per seed, the same budgets in each.
    Budgets where a seed states no fact are left out of that name's FactScore line.
    """
    import numpy as np

    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    colors = _colors(list(curves))
    for name, per_seed in curves.items():
        budgets = [p["budget"] for p in sorted(per_seed[0], key=lambda p: p["budget"])]
        at = [[next(p for p in points if p["budget"] == b) for points in per_seed] for b in budgets]
        scored = [(b, [p["factscore"] for p in ps]) for b, ps in zip(budgets, at)
                  if all(p["factscore"] is not None for p in ps)]
        if scored:
            x = np.array([b for b, _ in scored])
            values = np.array([v for _, v in scored], dtype=float)  # (budgets, seeds)
            mean, std = values.mean(1), values.std(1, ddof=1) if values.shape[1] > 1 else np.zeros(len(x))
            axes[0].plot(x, mean, marker="o", label=name, linewidth=1.4, color=colors[name])
            if values.shape[1] > 1:
                axes[0].fill_between(x, mean - std, mean + std, color=colors[name], alpha=0.15, linewidth=0)
        rates = np.array([[p["call_rate"] for p in ps] for ps in at], dtype=float)  # (budgets, seeds)
        axes[1].plot(budgets, rates.mean(1), marker="o", label=name, linewidth=1.2, color=colors[name])
    seeds = max((len(v) for v in curves.values()), default=1)
    axes[0].set_title("FactScore at each call budget" + (f" (band: ± 1 sd over {seeds} seeds)" if seeds > 1 else ""),
                      fontsize=10)
    axes[0].set_ylim(-0.02, 1.02)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    top = max((p["budget"] for v in curves.values() for points in v for p in points), default=1.0)
    axes[1].plot([0, top], [0, top], color="grey", linewidth=0.8, linestyle="--")
    axes[1].set_title("realised call rate", fontsize=10)
    for ax in axes:
        ax.set_xlabel("call budget (share of decoding steps)")
        ax.grid(alpha=0.3)
    return _save(fig, out)


def draw_regime(rows: list[dict[str, Any]]):
    """The figure of ``plot_regime``: two panels from the demo's rows (``lacy_fast.demo``):
    FactScore on frequent and rare people, alone and in cascade, per strategy (error bars:
    the seed spread); and the share of the cascade's held-out calls on unknown facts, known
    facts, free wording and other. The legends sit outside the axes, never over a bar."""
    import numpy as np

    by = {(r["strategy"], r["mode"]): r for r in rows}
    names = [r["strategy"] for r in rows if r["mode"] == "slm"]
    fig, axes = _pyplot().subplots(1, 2, figsize=(12, 5.2))
    bars = [("alone, frequent", "slm", "factscore_frequent"), ("alone, rare", "slm", "factscore_rare"),
            ("cascade, frequent", "cascade", "factscore_frequent"), ("cascade, rare", "cascade", "factscore_rare")]
    x = np.arange(len(names))
    width = 0.8 / len(bars)
    for i, (label, mode, key) in enumerate(bars):
        values = [(by.get((n, mode)) or {}).get(key) for n in names]
        errors = [(by.get((n, mode)) or {}).get(f"{key}_std") or 0.0 for n in names]
        axes[0].bar(x + (i - (len(bars) - 1) / 2) * width, [v if v is not None else 0.0 for v in values], width,
                    yerr=errors if any(errors) else None, label=label, capsize=2)
    axes[0].set_xticks(x, names)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_xlabel("SLM (training strategy)")
    axes[0].set_ylabel("FactScore")
    axes[0].set_title("FactScore by popularity bucket (cascade: equal call budget)", fontsize=10)
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    axes[0].grid(alpha=0.3, axis="y")
    classes = [("unknown facts", "calls_unknown_fact"), ("known facts", "calls_known_fact"),
               ("free wording", "calls_free"), ("other", "calls_other")]
    left = np.zeros(len(names))
    for label, key in classes:
        values = np.array([(by.get((n, "cascade")) or {}).get(key) or 0.0 for n in names])
        axes[1].barh(names, values, left=left, label=label)
        left += values
    axes[1].set_xlim(0, 1)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("share of the cascade's calls on held-out text")
    axes[1].set_title("where the cascade's calls land (held-out text)", fontsize=10)
    axes[1].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    return fig


def plot_regime(rows: list[dict[str, Any]], out: Path) -> Path:
    return _save(draw_regime(rows), out)


def plot_lock_in(runs: dict[str, list[dict[str, Any]]], out: Path) -> Path:
    """What training did to the learnable facts, from each run's metrics rows: the probe's
    ground-truth nll of its judge-labeled tokens (the demo's probe: frequent people's fact
    values) against ground-truth tokens, and ``selection_persistence`` beside its chance
    level (dashed) for the runs that rank."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4.2))
    colors = _colors(list(runs))
    for name, rows in runs.items():
        probed = [r for r in rows if r.get("probe_judge_nll") is not None]
        if probed:
            axes[0].plot([r["gt_tokens"] for r in probed], [r["probe_judge_nll"] for r in probed], label=name,
                         linewidth=1.4, color=colors[name])
        tracked = [r for r in rows if r.get("selection_persistence") is not None]
        if tracked:
            gt = [r["gt_tokens"] for r in tracked]
            axes[1].plot(gt, [r["selection_persistence"] for r in tracked], label=name, linewidth=1.4,
                         color=colors[name])
            axes[1].plot(gt, [r["selection_chance"] for r in tracked], linewidth=1.0, linestyle="--",
                         color=colors[name])
    axes[0].set_title("probe: ground-truth nll of frequent people's fact values", fontsize=10)
    axes[1].set_title("selected again at the next occurrence (dashed: chance)", fontsize=10)
    axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xlabel("ground-truth-gradient tokens")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", type=Path, help="training out_dirs (or metrics.jsonl files)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN/curves.png of the first run)")
    parser.add_argument("--smooth", type=int, help=shorthand_help("trailing-mean window in logged steps (default 1)",
                                                                   "smooth"))
    parser.add_argument("--x", choices=tuple(X_AXES), help=shorthand_help(
        "x axis: step (default) or gt_tokens, the ground-truth-gradient tokens seen", "x"))
    parser.add_argument("--explain", action="store_true", help="list every config key of this command and exit")


def run(args: argparse.Namespace) -> int:
    if args.explain:
        print_explain(PlotConfig, "plot", SHORTHANDS)
        return 0
    # Positionals are runs and key=value settings: `lacy-fast plot runs/a runs/b x=gt_tokens`.
    paths, args.overrides = split_overrides([str(r) for r in args.runs])
    cfg = build_config(PlotConfig, args, SHORTHANDS, command="plot")
    if not paths:
        raise UserError("no run given; pass one or more training out_dirs")
    runs = [Path(p) for p in paths]
    curves = {run_label(r): read_metrics(r) for r in runs}
    out = args.out or (runs[0] if runs[0].is_dir() else runs[0].parent) / "curves.png"
    plot_runs(curves, out, cfg.smooth, cfg.x)
    print(out)
    return 0
