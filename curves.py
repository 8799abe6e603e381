"""A run's training curves: every number its log.jsonl records per epoch, one panel each, as
curves.png in the run folder. It needs matplotlib (optional: pip install matplotlib).

    python curves.py runs/cifar10-resnet18-...      # any run folder of the three training scripts
"""
import json
import os
import sys
from pathlib import Path

from runs import SOFTWARE, UserError, check_picture, run_cli

NOT_CURVES = ("epoch", "step", "time", "images_per_s", "unreadable_images")


def plot(run_dir):
    """run_dir/curves.png from run_dir/log.jsonl, written atomically; returns its path."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("curves.png needs matplotlib: pip install matplotlib")
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


def main(argv=None):
    def run():
        args = sys.argv[1:] if argv is None else argv
        if args in (["-h"], ["--help"]):
            return print(__doc__.strip())
        if len(args) != 1 or args[0].startswith("-"):
            raise UserError("usage: python curves.py RUN_DIR (a folder with log.jsonl)")
        print(f"wrote {plot(args[0])}")

    run_cli("curves.py", run)


if __name__ == "__main__":
    main()
