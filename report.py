"""Table 1 and Figure 3 of the paper from validation.py's results.json files.

    python3 report.py --save_root ./saved_runs [--paper fine] [--out DIR]

Writes table1.md (minority-class accuracy, mean ± std over runs, per variant x ratio), table1.csv
(every class and metric) and figure3.png (per-class accuracy vs imbalance ratio, log x axis, one line
per variant, error bars = sample std over runs). With --paper, the paper's own Table 1
(paper_table1.json) is shown beside ours for the same cells.

When the save root holds the --reference method (default: proposed) and others, it also compares each
of them with it run by run (runs with the same number share seed, images and initialisation):
comparison.md, comparison.csv and comparison.png, on balanced accuracy, minority and majority accuracy:
the mean paired difference (method - reference) with its 95% t-interval, the exact sign-flip
permutation test's two-sided p-value (scipy.stats.permutation_test, all 2^n sign assignments), and
Holm's correction over all the cells (methods x ratios) of each metric's table.
"""
import argparse
import csv
import io
import json
import os

import numpy as np
from scipy import stats

from losses import METHODS
from runs import run_number
from utils import UserError, ensure_output_dir, run_main, write_text_atomic

HERE = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_root", required=True, help="folder holding <variant>/results.json")
    p.add_argument("--out", default=None, help="output folder (default: --save_root)")
    p.add_argument("--paper", choices=["coarse", "fine"], default=None, help="add the paper's Table 1 rows")
    p.add_argument("--minority", default=None, help="class shown in table1.md (default: the last of the classes)")
    p.add_argument("--reference", default=None, help="the method every other one is compared with, run by run "
                   "(default: proposed, the paper's method, when present)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level after Holm's correction (0.05)")
    return p


def load_results(save_root):
    """-> [(variant, {minority ratio: ratio entry})] in the paper's variant order, from variant folders."""
    if not os.path.isdir(save_root):
        raise UserError(f"--save_root {save_root} does not exist")
    order = list(METHODS)   # the paper's four, then the baselines, then any other method by name
    names = sorted(os.listdir(save_root), key=lambda v: (order.index(v) if v in order else len(order), v))
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


# ---------------------------------------------------------------- paired statistics

METRICS = (("balanced_accuracy", "balanced accuracy"), ("minority", "minority accuracy"),
           ("majority", "majority accuracy"))


def sign_flip_p(d):
    """Two-sided p-value of the exact paired permutation (sign-flip) test of mean(d) = 0: the fraction
    of the 2^n sign assignments of the differences d whose mean is at least as far from 0 as the
    observed one (scipy.stats.permutation_test, permutation_type='samples', every assignment); NaN for
    fewer than 2 pairs, where there is nothing to test."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2:
        return float("nan")
    res = stats.permutation_test((d, np.zeros_like(d)), lambda x, y, axis: np.mean(x - y, axis=axis),
                                 permutation_type="samples", n_resamples=np.inf, alternative="two-sided",
                                 vectorized=True)
    return float(res.pvalue)


def t_interval(d, level=0.95):
    """mean(d) -/+ t_{(1+level)/2, n-1} s / sqrt(n): the paired t confidence interval of the mean
    difference (scipy.stats.ttest_rel's confidence_interval); (nan, nan) for fewer than 2 pairs."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2:
        return float("nan"), float("nan")
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])              # no spread: scipy returns nan here
    ci = stats.ttest_rel(d, np.zeros_like(d)).confidence_interval(level)
    return float(ci.low), float(ci.high)


def holm(pvalues):
    """Holm's step-down adjusted p-values: sorted ascending, p_(i) x (m - i + 1), made non-decreasing
    and capped at 1, returned in the input order. NaN entries are left out of m and stay NaN."""
    p = np.asarray(pvalues, dtype=float)
    idx = [i for i in np.argsort(p, kind="stable") if not np.isnan(p[i])]
    out, running = np.full(len(p), np.nan), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * p[i]))
        out[i] = running
    return out.tolist()


def run_values(entry, metric, classes):
    """{run number: value} of one cell for metric 'balanced_accuracy', 'minority' (the last class's
    accuracy) or 'majority' (the first class's)."""
    cls = {"minority": classes[-1], "majority": classes[0]}.get(metric)
    return {run_number(r["run_dir"]): r["metrics"]["per_class_acc"][cls] if cls else r["metrics"][metric]
            for r in entry["runs"]}


def compare(results, reference, alpha=0.05):
    """Every method x ratio x metric against the reference, paired by run number -> list of rows
    (method, ratio, metric, n_pairs, mean_diff, ci_low, ci_high, p_value, p_holm, verdict).
    Holm's correction runs over the cells (methods x ratios) of one metric."""
    by_name = dict(results)
    ref = by_name[reference]
    rows = []
    for metric, _ in METRICS:
        table = []
        for name, cells in results:
            if name == reference:
                continue
            for ratio in sorted(cells, reverse=True):
                if ratio not in ref:
                    continue
                classes = cells[ratio]["classes"]
                a, b = run_values(cells[ratio], metric, classes), run_values(ref[ratio], metric, classes)
                pairs = sorted(set(a) & set(b))
                d = np.array([a[k] - b[k] for k in pairs])
                lo, hi = t_interval(d)
                table.append({"method": name, "ratio": ratio, "metric": metric, "n_pairs": len(pairs),
                              "mean_diff": float(d.mean()) if len(d) else float("nan"), "ci_low": lo, "ci_high": hi,
                              "p_value": sign_flip_p(d)})
        for row, adj in zip(table, holm([r["p_value"] for r in table])):
            row["p_holm"] = adj
            row["verdict"] = ("better" if row["mean_diff"] > 0 else "worse") if adj < alpha else "n.s."
        rows += table
    return rows


def _layout(rows):
    """-> (ratios, largest first; methods in order; {(method, ratio, metric): row})."""
    return (sorted({r["ratio"] for r in rows}, reverse=True), list(dict.fromkeys(r["method"] for r in rows)),
            {(r["method"], r["ratio"], r["metric"]): r for r in rows})


def comparison_markdown(rows, reference, alpha):
    ratios, methods, cell = _layout(rows)
    out = [f"Each method minus {reference}, paired by run (same seed, images and initialisation): mean difference "
           f"[95% t-interval], exact sign-flip p-value, Holm-adjusted over the {len(methods) * len(ratios)} cells "
           f"of each table. **better** / **worse**: significant at {alpha:g} after Holm (better/worse than "
           f"{reference}); n.s.: not significant. n = pairs.", ""]
    for metric, title in METRICS:
        out += [f"### {title}", "", "| method | " + " | ".join(f"1:{r:g}" for r in ratios) + " |",
                "|---" * (len(ratios) + 1) + "|"]
        for m in methods:
            cells = []
            for ratio in ratios:
                r = cell.get((m, ratio, metric))
                if r is None or r["n_pairs"] == 0:
                    cells.append("–")
                    continue
                if r["n_pairs"] < 2:
                    cells.append(f"{r['mean_diff']:+.3f} (n=1: no test)")
                    continue
                verdict = f"**{r['verdict']}**" if r["verdict"] != "n.s." else "n.s."
                cells.append(f"{r['mean_diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] p={r['p_value']:.3f} "
                             f"(Holm {r['p_holm']:.3f}, n={r['n_pairs']}) {verdict}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def comparison_csv(rows):
    buf = io.StringIO()
    keys = ["method", "ratio", "metric", "n_pairs", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "verdict"]
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: f"{r[k]:.6g}" if isinstance(r[k], float) else r[k] for k in keys})
    return buf.getvalue()


def comparison_figure(rows, reference, path):
    """One panel per metric x ratio: each method's mean paired difference with its 95% interval; filled
    markers where Holm-significant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ratios, methods, cell = _layout(rows)
    fig, axes = plt.subplots(len(METRICS), len(ratios), figsize=(4.2 * len(ratios), 0.32 * len(methods) * 3 + 2.5),
                             squeeze=False, sharey=True)
    for i, (metric, title) in enumerate(METRICS):
        for j, ratio in enumerate(ratios):
            ax = axes[i][j]
            for y, m in enumerate(methods):
                r = cell.get((m, ratio, metric))
                if r is None or r["n_pairs"] == 0:
                    continue
                colour = {"better": "tab:green", "worse": "tab:red"}.get(r["verdict"], "tab:gray")
                lo, hi = r["ci_low"], r["ci_high"]
                if not np.isnan(lo):
                    ax.plot([lo, hi], [y, y], color=colour, lw=2)
                ax.plot(r["mean_diff"], y, "o", color=colour, mfc=colour if r["verdict"] != "n.s." else "white")
            ax.axvline(0, color="black", lw=0.8)
            ax.set_yticks(range(len(methods)))
            ax.set_yticklabels(methods)
            ax.set_title(f"{title}, 1:{ratio:g}", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
            if i == len(METRICS) - 1:
                ax.set_xlabel(f"method - {reference} (paired, 95% CI)")
    axes[0][0].invert_yaxis()                        # shared: the first method on top, in every panel
    fig.suptitle(f"Paired differences from {reference}: green/red = significant after Holm, grey = not")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    names, reference = [v for v, _ in results], args.reference or "proposed"
    if args.reference and args.reference not in names:
        raise UserError(f"--reference {args.reference}: no such method under {args.save_root} ({' '.join(names)})")
    if reference in names and len(names) > 1:
        rows = compare(results, reference, args.alpha)
        cmp_md = comparison_markdown(rows, reference, args.alpha)
        write_text_atomic(os.path.join(out, "comparison.md"), cmp_md)
        write_text_atomic(os.path.join(out, "comparison.csv"), comparison_csv(rows))
        comparison_figure(rows, reference, os.path.join(out, "comparison.png"))
        print(cmp_md)
        print(f"wrote {', '.join(os.path.join(out, n) for n in ('comparison.md', 'comparison.csv', 'comparison.png'))}")


if __name__ == "__main__":
    run_main(main)
