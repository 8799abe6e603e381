"""A run's training curves: every number its log.jsonl records per epoch (pretrain.py's loss,
contrast_acc, entropy, lr and kNN top-1; finetune.py's and distill.py's alike), one panel each,
as curves.png in the run folder.

    python curves.py runs/cifar10-resnet18-...      # any run folder of the three scripts

It needs matplotlib (pip install matplotlib: optional, as reproduce.py's figures); without it
this command says so. The loops draw nothing: a picture is drawn when it is asked for.
"""
import json
import os
import sys
from pathlib import Path

from runs import SOFTWARE, UserError, check_picture, run_cli

NOT_CURVES = ("epoch", "step", "time", "images_per_s", "unreadable_images")


def plot(run_dir):
    """run_dir/curves.png from run_dir/log.jsonl, written atomically; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = Path(run_dir) / "log.jsonl"
    try:
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {log}: {e}")
    names = list(dict.fromkeys(k for r in records for k, v in r.items()
                               if k not in NOT_CURVES and isinstance(v, (int, float))))
    if not names:
        raise UserError(f"{log} records no epoch yet")
    out = check_picture(log.with_name("curves.png"), "curves.png")  # not over a picture of yours
    fig, axes = plt.subplots(1, len(names), figsize=(2.8 * len(names), 2.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = [(r["epoch"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        ax.plot(*zip(*points), marker="o" if len(points) <= 20 else None, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".tmp.png"), dpi=100, metadata={"Software": SOFTWARE})
    plt.close(fig)
    os.replace(out.with_suffix(".tmp.png"), out)
    return out


def plot_if_possible(run_dir):
    """plot() where matplotlib is importable, else None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return plot(run_dir)


def main(argv=None):
    def run():
        args = sys.argv[1:] if argv is None else argv
        if args in (["-h"], ["--help"]):
            return print(__doc__.strip())
        if len(args) != 1 or args[0].startswith("-"):
            raise UserError("usage: python curves.py RUN_DIR (a folder with log.jsonl)")
        out = plot_if_possible(args[0])
        if out is None:
            raise UserError("curves.png needs matplotlib: pip install matplotlib")
        print(f"wrote {out}")

    run_cli("curves.py", run)


if __name__ == "__main__":
    main()
