"""Table 1 and Figure 3 of the paper from validation.py's results.json files.

    python3 report.py --save_root ./saved_runs [--paper fine] [--out DIR]

Writes table1.md (minority-class accuracy, mean ± std over runs, per variant x ratio), table1.csv
(every class and metric) and figure3.png (per-class accuracy vs imbalance ratio, log x axis, one line
per variant, error bars = sample std over runs). With --paper, the paper's own Table 1
(paper_table1.json) is shown beside ours for the same cells.
"""
import argparse
import csv
import io
import json
import os

from utils import VARIANTS, UserError, ensure_output_dir, run_main, write_text_atomic

HERE = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_root", required=True, help="folder holding <variant>/results.json")
    p.add_argument("--out", default=None, help="output folder (default: --save_root)")
    p.add_argument("--paper", choices=["coarse", "fine"], default=None, help="add the paper's Table 1 rows")
    p.add_argument("--minority", default=None, help="class shown in table1.md (default: the last of the classes)")
    return p


def load_results(save_root):
    """-> [(variant, {minority ratio: ratio entry})] in the paper's variant order, from variant folders."""
    if not os.path.isdir(save_root):
        raise UserError(f"--save_root {save_root} does not exist")
    names = sorted(os.listdir(save_root), key=lambda v: (VARIANTS.index(v) if v in VARIANTS else 99, v))
    out = []
    for v in names:
        path = os.path.join(save_root, v, "results.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                ratios = json.load(f)["variants"][v]
            out.append((v, {e["ratio"][-1] / e["ratio"][0]: e for e in ratios.values()}))
    if not out:
        raise UserError(f"no <variant>/results.json under {save_root}; run validation.py first")
    return out


def fmt(mean, std, n):
    return f"{mean:.4f} ± {std:.4f} (n={n})" if std is not None else f"{mean:.4f} (n={n})"


def markdown_table(results, minority, paper=None):
    ratios = sorted({r for _, cells in results for r in cells}, reverse=True)
    head = [f"Accuracy of the minority class ({minority}): mean ± sample std over n runs", "",
            "| variant | " + " | ".join(f"{r:g}" for r in ratios) + " |",
            "|---" * (len(ratios) + 1) + "|"]
    rows = []
    for v, cells in results:
        vals = []
        for r in ratios:
            e = cells.get(r)
            key = f"acc[{minority}]"
            vals.append(fmt(e["summary"]["mean"][key], e["summary"]["std"][key], e["summary"]["n_runs"])
                        if e and key in e["summary"]["mean"] else "–")
        rows.append(f"| {v} | " + " | ".join(vals) + " |")
        if paper and v in paper:
            pv = dict(zip(paper["ratios"], paper[v]))
            rows.append(f"| {v} (paper, {paper['minority_class']}) | "
                        + " | ".join(f"{pv[r]:.4f}" if r in pv else "–" for r in ratios) + " |")
    return "\n".join(head + rows) + "\n"


def csv_table(results):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "ratio", "metric", "mean", "std", "n_runs"])
    for v, cells in results:
        for r, e in sorted(cells.items(), reverse=True):
            s = e["summary"]
            for k in s["mean"]:
                w.writerow([v, f"{r:g}", k, f"{s['mean'][k]:.6f}",
                            "" if s["std"][k] is None else f"{s['std'][k]:.6f}", s["n_runs"]])
    return buf.getvalue()


def figure(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    classes = next(iter(next(iter(results))[1].values()))["classes"]
    fig, axes = plt.subplots(1, len(classes), figsize=(5 * len(classes), 4), squeeze=False)
    for ax, c in zip(axes[0], classes):
        for v, cells in results:
            rs = sorted(cells)
            key = f"acc[{c}]"
            mean = [cells[r]["summary"]["mean"][key] for r in rs]
            std = [cells[r]["summary"]["std"][key] or 0.0 for r in rs]
            ax.errorbar(rs, mean, yerr=std, marker="o", capsize=3, label=v)
        ax.set_xscale("log")
        ax.invert_xaxis()  # balanced (1) on the left, rarest on the right, as in Table 1
        ax.set_xlabel("imbalance ratio (minority : majority)")
        ax.set_ylabel("accuracy")
        ax.set_title(c)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend()
    fig.suptitle("Per-class test accuracy vs imbalance ratio (mean ± std over runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not os.path.isdir(args.save_root):
        raise UserError(f"--save_root {args.save_root} does not exist")
    out = ensure_output_dir(args.out or args.save_root, "--out" if args.out else "--save_root")
    results = load_results(args.save_root)
    classes = next(iter(results[0][1].values()))["classes"]
    minority = args.minority or classes[-1]
    if minority not in classes:
        raise UserError(f"--minority {minority!r} is not one of the classes: {' '.join(classes)}")
    paper = None
    if args.paper:
        with open(os.path.join(HERE, "paper_table1.json"), encoding="utf-8") as f:
            paper = json.load(f)[args.paper]
    md = markdown_table(results, minority, paper)
    write_text_atomic(os.path.join(out, "table1.md"), md)
    write_text_atomic(os.path.join(out, "table1.csv"), csv_table(results))
    figure(results, os.path.join(out, "figure3.png"))
    print(md)
    print(f"wrote {', '.join(os.path.join(out, n) for n in ('table1.md', 'table1.csv', 'figure3.png'))}")


if __name__ == "__main__":
    run_main(main)
