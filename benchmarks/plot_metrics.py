"""Plot a run's `metrics.jsonl`: training loss and held-out error against steps (needs matplotlib).

    python benchmarks/plot_metrics.py runs/tiny/metrics.jsonl docs/tiny-learning-curve.png
"""

from __future__ import annotations

import argparse
import json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="a run's metrics.jsonl")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--title", default="tiny config: vision-based distillation on CPU")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(args.metrics)]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval_error"]) for r in records if "eval_error" in r]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.6, label="training loss (MSE of predictions, per step)")
    ax.plot(*zip(*held_out, strict=True), "o-", lw=1.8, label="held-out error (along the teacher's trajectory)")
    ax.axhline(held_out[0][1] / 5, color="gray", ls="--", lw=0.8, label="a fifth of the starting held-out error")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE, student vs teacher prediction")
    ax.set_title(args.title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}: held-out error {held_out[0][1]:.3g} -> {held_out[-1][1]:.3g} "
          f"({held_out[0][1] / held_out[-1][1]:.1f}x lower)")


if __name__ == "__main__":
    main()
