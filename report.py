"""Table 1 and Figure 3 of the paper from validation.py's results.json files.

    python3 report.py --save_root ./saved_runs [--paper fine] [--out DIR]
    python3 report.py --docs [--check]      # the docs' results tables from results/ (record.py)

Writes table1.md (minority-class accuracy, mean ± std over runs, per variant x ratio), table1.csv
(every class and metric) and figure3.png (per-class accuracy vs imbalance ratio, log x axis, one line
per variant, error bars = sample std over runs). With --paper, the paper's own Table 1
(paper_table1.json) is shown beside ours for the same cells.

When the save root holds the --reference method (default: proposed) and others, it also compares each
of them with it run by run (runs with the same recorded seed and planned images share their data,
stream and initialisation):
comparison.md, comparison.csv and comparison.png, on balanced accuracy, minority and majority accuracy:
the mean paired difference (method - reference) with its 95% t-interval, the exact sign-flip
permutation test's two-sided p-value (scipy.stats.permutation_test, all 2^n sign assignments), and
Holm's correction over all the cells (methods x ratios) of each metric's table.
"""
import csv
import io
import json
import os

import numpy as np
from scipy import stats

from losses import METHODS
from runs import SELECT_RULES, run_number
from validation import SELECT_TEXT, results_name
from utils import UserError, command_line, ensure_output_dir, run_main, write_text_atomic

HERE = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    p = command_line(__doc__)
    p.add_argument("--save_root", help="folder holding <variant>/results.json (required unless --docs)")
    p.add_argument("--out", default=None, help="output folder (default: --save_root)")
    p.add_argument("--paper", choices=["coarse", "fine"], default=None, help="add the paper's Table 1 rows")
    p.add_argument("--minority", default=None, help="class shown in table1.md and compared as 'minority accuracy' (default: the last of the "
                   "classes); 'majority accuracy' is the first class's, the ratio's reference")
    p.add_argument("--reference", default=None, help="the method every other one is compared with, run by run "
                   "(default: proposed, the paper's method, when present)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level after Holm's correction (0.05)")
    p.add_argument("--select", default="train_acc", choices=SELECT_RULES, help="report the evaluation under this rule "
                   "of model selection (validation.py --select): train_acc (default, the paper's rule) reads "
                   "results.json and writes to --save_root; another rule reads results_<rule>.json and writes to "
                   "<save_root>/select_<rule>/ unless --out is given")
    p.add_argument("--docs", action="store_true", help="instead: render every results table of README.md and "
                   "docs/results.md, and docs/headline.png, from the committed results/ (record.py)")
    p.add_argument("--check", action="store_true", help="with --docs: change nothing, and exit 1 naming each "
                   "generated block of the docs that differs from what results/ gives")
    return p


def read_results(path, variants=None, hint=""):
    """One results.json of validation.py -> [(variant, {ratio: ratio entry}, meta)] for variants (default:
    every variant it holds); UserError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        held = {v: res["variants"][v] for v in (variants or res["variants"])}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a results.json of validation.py"
                        + (f" for {', '.join(map(repr, variants))}" if variants else "") + f" ({type(e).__name__}: {e}){hint}")
    meta = {"test_data_root": res.get("test_data_root"), "precision": res.get("precision"),
            "select": res.get("select", "train_acc"), "path": path}
    return [(v, {tuple(e["ratio"]): e for e in ratios.values()}, meta) for v, ratios in held.items()]


def load_results(save_root, select="train_acc"):
    """-> [(variant, {ratio: ratio entry}, {'test_data_root', 'precision', 'path'})] in the table's method
    order, from the variant folders' results.json, or, where no variant folder has one, from the file
    validation.py writes over the whole save root (results/ keeps only that one). A ratio is the whole
    tuple of its parts (1.0, 0.1), so that 1:0.5:0.1 and 1:0.2:0.1 stay two cells. A method whose runs all
    failed (an evaluation after a Slurm array whose tasks of that method failed) is listed with no cell."""
    if not os.path.isdir(save_root):
        raise UserError(f"--save_root {save_root} does not exist")
    order = list(METHODS)   # the paper's four, then the baselines, then any other method by name
    in_order = lambda names: sorted(names, key=lambda v: (order.index(v) if v in order else len(order), v))
    out = []
    for v in in_order(os.listdir(save_root)):
        path = os.path.join(save_root, v, results_name(select))
        if os.path.isfile(path):
            out += read_results(path, [v], f"; run validation.py --model_root {os.path.join(save_root, v)} again")
    combined = os.path.join(save_root, results_name(select))
    if not out and os.path.isfile(combined):    # validation.py's file over the whole root (results/ keeps only it)
        by_name = {v: (v, cells, meta) for v, cells, meta in read_results(combined)}
        out = [by_name[v] for v in in_order(by_name)]
    if not out:
        raise UserError(f"no <variant>/{results_name(select)} under {save_root}; run validation.py"
                        + ("" if select == "train_acc" else f" --select {select}") + " first")
    return out


def ratio_label(ratio):
    """(1.0, 0.01) -> '0.01' (the minority fraction, as the paper's Table 1 heads its columns); with more
    than two classes the whole ratio, '1:0.5:0.1'."""
    return f"{ratio[-1] / ratio[0]:g}" if len(ratio) == 2 else ":".join(f"{r:g}" for r in ratio)


def ratio_order(ratios):
    """Ratios from the most balanced to the most imbalanced (as the paper's columns)."""
    return sorted(ratios, key=lambda r: [-x / r[0] for x in r[1:]])


def the_classes(results):
    """The class names, from any evaluated cell; UserError when no method has one."""
    for _, cells, _ in results:
        for e in cells.values():
            return e["classes"]
    raise UserError("no method under --save_root has an evaluated run (every results.json is empty); check "
                    "the 'skipped' reasons in each result_log.txt")


def fmt(mean, std, n):
    return f"{mean:.4f} ± {std:.4f} (n={n})" if std is not None else f"{mean:.4f} (n={n})"


def markdown_table(results, minority, paper=None, select="train_acc"):
    ratios = ratio_order({r for _, cells, _ in results for r in cells})
    head = [f"Accuracy of the minority class ({minority}): mean ± sample std over n runs, each at the epoch of "
            f"{SELECT_TEXT[select]}", "",
            "| variant | " + " | ".join(ratio_label(r) for r in ratios) + " |",
            "|---" * (len(ratios) + 1) + "|"]
    rows = []
    key = f"acc[{minority}]"
    for v, cells, _ in results:
        vals = []
        for r in ratios:
            e = cells.get(r)
            vals.append(fmt(e["summary"]["mean"][key], e["summary"]["std"][key], e["summary"]["n_runs"])
                        if e and key in e["summary"]["mean"] else "–")
        rows.append(f"| {v} | " + " | ".join(vals) + " |" + ("" if cells else " (no evaluated run)"))
        if paper and v in paper:
            pv = dict(zip(paper["ratios"], paper[v]))
            rows.append(f"| {v} (paper, {paper['minority_class']}) | "
                        + " | ".join(f"{pv[r[-1] / r[0]]:.4f}" if len(r) == 2 and r[-1] / r[0] in pv else "–"
                                     for r in ratios) + " |")
    return "\n".join(head + rows) + "\n"


def csv_table(results):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "ratio", "metric", "mean", "std", "n_runs"])
    for v, cells, _ in results:
        for r in ratio_order(cells):
            s = cells[r]["summary"]
            for k in s["mean"]:
                w.writerow([v, ratio_label(r), k, f"{s['mean'][k]:.6f}",
                            "" if s["std"][k] is None else f"{s['std'][k]:.6f}", s["n_runs"]])
    return buf.getvalue()


def figure(results, classes, path):
    """Per-class accuracy against the minority fraction (the last part of the ratio over the first)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(classes), figsize=(5 * len(classes), 4), squeeze=False)
    for ax, c in zip(axes[0], classes):
        for v, cells, _ in results:
            rs = ratio_order(cells)
            if not rs:
                continue
            key = f"acc[{c}]"
            mean = [cells[r]["summary"]["mean"][key] for r in rs]
            std = [cells[r]["summary"]["std"][key] or 0.0 for r in rs]
            ax.errorbar([r[-1] / r[0] for r in rs], mean, yerr=std, marker="o", capsize=3, label=v)
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
    fewer than 2 pairs, where there is nothing to test, and for a non-finite difference (a run with no
    readable test image of a class has no accuracy for it), which no test can order."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2 or not np.all(np.isfinite(d)):
        return float("nan")
    res = stats.permutation_test((d, np.zeros_like(d)), lambda x, y, axis: np.mean(x - y, axis=axis),
                                 permutation_type="samples", n_resamples=np.inf, alternative="two-sided",
                                 vectorized=True)
    return float(res.pvalue)


def t_interval(d, level=0.95):
    """mean(d) -/+ t_{(1+level)/2, n-1} s / sqrt(n): the paired t confidence interval of the mean
    difference (scipy.stats.ttest_rel's confidence_interval); (nan, nan) for fewer than 2 pairs or a
    non-finite difference."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2 or not np.all(np.isfinite(d)):
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


def run_values(entry, metric, minority, majority):
    """[(seed, planned subset sha1, value, run folder)] of one cell's runs, for metric
    'balanced_accuracy', 'minority' (the accuracy of class minority) or 'majority' (of class majority).
    Seed and subset come from the run's recorded settings (results.json); a run evaluated by an older
    version without them counts by its folder number, as train.py seeds it by default."""
    cls = {"minority": minority, "majority": majority}.get(metric)
    out = []
    for r in entry["runs"]:
        settings = r.get("settings") or {}
        seed = settings.get("seed", run_number(r["run_dir"]))
        value = r["metrics"]["per_class_acc"][cls] if cls else r["metrics"][metric]
        out.append((seed, settings.get("planned_subset_sha1"), float("nan") if value is None else value, r["run_dir"]))
    return out


def pair_runs(a, b):
    """Pair the runs of two cells that share a seed and the images it chose (the same planned subset):
    the same data, stream and initialisation, so that the difference is the method's. -> (pairs
    [(value a, value b)] in seed order, notes on runs left out and why)."""
    def by_seed(runs):
        seeds = [r[0] for r in runs]
        return {r[0]: r for r in runs if seeds.count(r[0]) == 1}, sorted({s for s in seeds if seeds.count(s) > 1})
    (sa, dup_a), (sb, dup_b) = by_seed(a), by_seed(b)
    pairs, notes = [], []
    for seed in sorted(set(sa) & set(sb)):
        if sa[seed][1] != sb[seed][1]:
            notes.append(f"seed {seed}: {sa[seed][3]} and {sb[seed][3]} trained on different images (planned "
                         f"subsets {sa[seed][1]} vs {sb[seed][1]}); not paired")
            continue
        pairs.append((sa[seed][2], sb[seed][2]))
    for seed in sorted(set(dup_a) | set(dup_b)):
        notes.append(f"seed {seed}: more than one run with this seed in a cell; not paired")
    return pairs, notes


def check_comparable(name, meta, reference, ref_meta):
    """Two methods are compared only on the same test images, evaluated at the same precision."""
    for key, what in (("test_data_root", "test folder"), ("precision", "evaluation precision"),
                      ("select", "rule of model selection")):
        if meta[key] != ref_meta[key]:
            raise UserError(f"{name} and {reference} were evaluated with another {what} ({meta[key]} in "
                            f"{meta['path']}, {ref_meta[key]} in {ref_meta['path']}), so their runs cannot be "
                            f"compared; evaluate both with the same validation.py --test_data_root and --precision")


def compare(results, reference, minority, majority, alpha=0.05):
    """Every method x ratio x metric against the reference, runs paired by seed and planned subset ->
    (rows, notes). A row: method, ratio, metric, n_pairs, mean_diff, ci_low, ci_high, p_value, p_holm,
    verdict ('better' / 'worse' after Holm at alpha, 'n.s.', or 'no test' for fewer than 2 pairs or a
    non-finite difference). Holm's correction runs over the tested cells (methods x ratios) of one metric."""
    by_name = {name: (cells, meta) for name, cells, meta in results}
    ref, ref_meta = by_name[reference]
    rows, notes = [], []
    for name, cells, meta in results:
        if name != reference and cells:
            check_comparable(name, meta, reference, ref_meta)
    for metric, _ in METRICS:
        table = []
        for name, cells, _ in results:
            if name == reference:
                continue
            for ratio in ratio_order(cells):
                if ratio not in ref:
                    continue
                pairs, left_out = pair_runs(run_values(cells[ratio], metric, minority, majority),
                                            run_values(ref[ratio], metric, minority, majority))
                if metric == METRICS[0][0]:
                    notes += [f"{name} vs {reference} at {ratio_label(ratio)}: {n}" for n in left_out]
                d = np.array([x - y for x, y in pairs])
                lo, hi = t_interval(d)
                table.append({"method": name, "ratio": ratio, "metric": metric, "n_pairs": len(pairs),
                              "mean_diff": float(d.mean()) if len(d) else float("nan"), "ci_low": lo, "ci_high": hi,
                              "p_value": sign_flip_p(d)})
        for row, adj in zip(table, holm([r["p_value"] for r in table])):
            row["p_holm"] = adj
            row["verdict"] = ("no test" if np.isnan(adj) else
                              ("better" if row["mean_diff"] > 0 else "worse") if adj < alpha else "n.s.")
        rows += table
    return rows, notes


def _layout(rows):
    """-> (ratios, largest first; methods in order; {(method, ratio, metric): row})."""
    return (ratio_order({r["ratio"] for r in rows}), list(dict.fromkeys(r["method"] for r in rows)),
            {(r["method"], r["ratio"], r["metric"]): r for r in rows})


def comparison_markdown(rows, reference, alpha, minority, majority, notes=(), select=None):
    ratios, methods, cell = _layout(rows)
    n_cells = len(methods) * len(ratios)
    out = [f"Each method minus {reference}, paired by run (same seed and the same planned images, hence the same "
           f"initialisation and data stream): mean difference [95% t-interval], exact sign-flip p-value, "
           f"Holm-adjusted over the tested cells of each table (up to {n_cells}). **better** / **worse**: "
           f"significant at {alpha:g} after Holm (better/worse than {reference}); n.s.: not significant. The "
           f"verdict comes from the Holm-adjusted sign-flip test; the t-interval is printed to show the size of the "
           f"difference, so an interval that excludes 0 can stand beside n.s. n = pairs."
           + (f" Each run evaluated at the epoch chosen by {SELECT_TEXT.get(select, select)}." if select else ""), ""]
    for metric, title in METRICS:
        title += {"minority": f" ({minority})", "majority": f" ({majority})"}.get(metric, "")
        out += [f"### {title}", "", "| method | " + " | ".join(f"1:{ratio_label(r)}" if len(r) == 2 else ratio_label(r)
                                                             for r in ratios) + " |",
                "|---" * (len(ratios) + 1) + "|"]
        for m in methods:
            cells = []
            for ratio in ratios:
                r = cell.get((m, ratio, metric))
                if r is None or r["n_pairs"] == 0:
                    cells.append("–")
                elif not np.isfinite(r["mean_diff"]):
                    cells.append(f"no test (n={r['n_pairs']}: a run has no readable test image of a class)")
                elif r["n_pairs"] < 2:
                    cells.append(f"{r['mean_diff']:+.3f} (n=1: no test)")
                else:
                    verdict = f"**{r['verdict']}**" if r["verdict"] in ("better", "worse") else r["verdict"]
                    cells.append(f"{r['mean_diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] "
                                 f"p={r['p_value']:.3f} (Holm {r['p_holm']:.3f}, n={r['n_pairs']}) {verdict}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    if notes:
        out += ["Runs left out of the pairing:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def comparison_csv(rows):
    buf = io.StringIO()
    keys = ["method", "ratio", "metric", "n_pairs", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "verdict"]
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ratio_label(r[k]) if k == "ratio" else f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]
                    for k in keys})
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
                if not np.isfinite(r["mean_diff"]):
                    continue
                if not np.isnan(lo):
                    ax.plot([lo, hi], [y, y], color=colour, lw=2)
                ax.plot(r["mean_diff"], y, "o", color=colour, mfc=colour if r["verdict"] != "n.s." else "white")
            ax.axvline(0, color="black", lw=0.8)
            ax.set_yticks(range(len(methods)))
            ax.set_yticklabels(methods)
            ax.set_title(f"{title}, {':'.join(f'{x:g}' for x in ratio)}", fontsize=9)
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
    if args.docs:
        import record
        changed = record.update_docs(check=args.check)
        for path, names in changed:
            print(f"{path}: {'differs from results/ in' if args.check else 're-rendered'} {' '.join(names)}")
        if args.check and changed:
            raise SystemExit(1)
        if not changed:
            print("the docs' tables are results/'s")
        return
    if args.check:
        raise UserError("--check goes with --docs")
    if not args.save_root:
        raise UserError("--save_root is required (the folder holding <variant>/results.json), unless --docs")
    if not os.path.isdir(args.save_root):
        raise UserError(f"--save_root {args.save_root} does not exist")
    default_out = args.save_root if args.select == "train_acc" else os.path.join(args.save_root, f"select_{args.select}")
    out = ensure_output_dir(args.out or default_out, "--out" if args.out else "--save_root")
    results = load_results(args.save_root, args.select)
    classes = the_classes(results)
    minority = args.minority or classes[-1]
    if minority not in classes:
        raise UserError(f"--minority {minority!r} is not one of the classes: {' '.join(classes)}")
    majority = classes[0]                     # the ratio's reference class
    empty = [v for v, cells, _ in results if not cells]
    paper = None
    if args.paper:
        with open(os.path.join(HERE, "paper_table1.json"), encoding="utf-8") as f:
            paper = json.load(f)[args.paper]
    md = markdown_table(results, minority, paper, args.select)
    write_text_atomic(os.path.join(out, "table1.md"), md)
    write_text_atomic(os.path.join(out, "table1.csv"), csv_table(results))
    figure(results, classes, os.path.join(out, "figure3.png"))
    print(md)
    if empty:
        print(f"no evaluated run (see each result_log.txt for why): {' '.join(empty)}")
    print(f"wrote {', '.join(os.path.join(out, n) for n in ('table1.md', 'table1.csv', 'figure3.png'))}")
    names, reference = [v for v, _, _ in results], args.reference or "proposed"
    if args.reference and args.reference not in names:
        raise UserError(f"--reference {args.reference}: no such method under {args.save_root} ({' '.join(names)})")
    if reference in names and len(names) > 1:
        rows, notes = compare(results, reference, minority, majority, args.alpha)
        if not rows:
            print(f"no comparison with {reference}: no other method has an evaluated run at a ratio {reference} has"
                  + (f" ({'; '.join(notes)})" if notes else ""))
            return
        cmp_md = comparison_markdown(rows, reference, args.alpha, minority, majority, notes, args.select)
        write_text_atomic(os.path.join(out, "comparison.md"), cmp_md)
        write_text_atomic(os.path.join(out, "comparison.csv"), comparison_csv(rows))
        comparison_figure(rows, reference, os.path.join(out, "comparison.png"))
        print(cmp_md)
        print(f"wrote {', '.join(os.path.join(out, n) for n in ('comparison.md', 'comparison.csv', 'comparison.png'))}")


if __name__ == "__main__":
    run_main(main)
