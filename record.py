"""The results of record: every results table of README.md and docs/results.md, rendered from results/.

    python3 report.py --docs            # rewrite the generated blocks of README.md and docs/results.md
    python3 report.py --docs --check    # change nothing; exit 1 naming each block that differs

results/<result>/ holds the canonical run of each result the docs show (the demo, the study's regime 1
and regime 2): validation.py's output over each condition (<condition>/results*.json: every run's
settings and seed, the epoch chosen and its per-class accuracies) and provenance.json (commit,
command, machine with its CPU flags, torch, threads, wall time). results/stability.csv holds the key
cells of the earlier runs of regime 1, whose per-run files were not kept, with where each row was read.

A generated block sits between the lines `<!-- record:NAME -->` and `<!-- /record:NAME -->`. Its
tables come from report.py's own functions (report.markdown_table, report.compare and
report.comparison_markdown: one statistics path), so a re-run that moves a number moves the docs, and
tests/test_record.py fails while the committed docs differ from what results/ gives.
"""
import csv
import functools
import json
import os
import re

import numpy as np

import report
from utils import UserError, write_text_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DOCS = ("README.md", os.path.join("docs", "results.md"))
FIGURE = os.path.join("docs", "headline.png")
STUDY_FIGURE = os.path.join("docs", "study_fine_comparison.png")
DEMO_FIGURE = os.path.join("docs", "demo_{}_figure3.png")
BLOCK = re.compile(r"<!-- record:(?P<name>[a-z0-9_]+) -->\n(?P<body>.*?)<!-- /record:(?P=name) -->", re.S)

R01, R001, R0005 = (1.0, 0.1), (1.0, 0.01), (1.0, 0.005)
LOSS_REMEDIES = ("focal", "cb", "ldam_drw", "la")
NAMES = {"baseline": "cross-entropy alone", "contrastive": "the paper's term alone", "oversampling": "oversampling",
         "proposed": "proposed (oversampling + the paper's term)", "focal": "focal loss", "cb": "class-balanced loss",
         "ldam_drw": "LDAM-DRW", "la": "logit adjustment", "sqrt": "square-root sampling",
         "oversample+supcon": "oversampling + supervised contrastive",
         "oversample+fscl_neg1": "oversampling + the paper's term with target -1"}
RULES = (("last", "`last`: every run at its last epoch (the headline's rule)"),
         ("train_acc", "`train_acc`: the epoch of the highest Train Acc (the paper's rule)"),
         ("balanced_train_acc", "`balanced_train_acc`: the epoch of the highest balanced Train Acc"))


# ---------------------------------------------------------------- reading results/

@functools.lru_cache(maxsize=None)
def load(result, cond, select="train_acc"):
    """report.load_results of results/<result>/<cond> under a rule."""
    return tuple(report.load_results(os.path.join(RESULTS, result, cond), select))


@functools.lru_cache(maxsize=None)
def paper(cond):
    """The paper's Table 1 for a condition (paper_table1.json, as report.py --paper reads it)."""
    with open(os.path.join(HERE, "paper_table1.json"), encoding="utf-8") as f:
        return json.load(f)[cond]


def paper_value(cond, method, ratio):
    """The paper's minority accuracy for a method at a two-class ratio, None where it reports none."""
    table = paper(cond)
    return dict(zip(table["ratios"], table[method])).get(ratio[1]) if method in table else None


@functools.lru_cache(maxsize=None)
def provenance(result):
    path = os.path.join(RESULTS, result, "provenance.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: {e}")


def cells(result, cond, select="train_acc"):
    return {name: c for name, c, _ in load(result, cond, select)}


def classes(result, cond):
    return report.the_classes(list(load(result, cond)))


@functools.lru_cache(maxsize=None)
def comparison(result, cond, select, reference):
    """report.compare against reference -> ({(method, ratio, metric): row}, rows, notes)."""
    res = list(load(result, cond, select))
    cls = classes(result, cond)
    rows, notes = report.compare(res, reference, cls[-1], cls[0])
    return {(r["method"], r["ratio"], r["metric"]): r for r in rows}, rows, notes


def family(result, cond, select, reference):
    """How many cells Holm's correction ran over in one metric's table."""
    table, _, _ = comparison(result, cond, select, reference)
    return sum(1 for (_, _, metric), r in table.items() if metric == "balanced_accuracy" and not np.isnan(r["p_value"]))


def ms(entry, key, digits=3):
    s = entry["summary"]
    std = s["std"][key]
    return f"{s['mean'][key]:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def mean(entry, key):
    return entry["summary"]["mean"][key]


def diff(row, ci=True):
    """'-0.004 [-0.051, +0.043], Holm p 1.00' from a report.compare row."""
    text = f"{row['mean_diff']:+.3f}"
    if ci:
        text += f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
    return text + f", Holm p {row['p_holm']:.3f}" if row["p_holm"] < 0.1 else text + f", Holm p {row['p_holm']:.2f}"


def verdict(row):
    return {"better": "**better**", "worse": "**worse**"}.get(row["verdict"], row["verdict"])


def epochs_by_seed(entry):
    runs = sorted(entry["runs"], key=lambda r: (r.get("settings") or {}).get("seed", 0))
    picked = [str(r["best_epoch"]) for r in runs]
    return f"{picked[0]} in every run" if len(set(picked)) == 1 else ",".join(picked)


def label(ratio):
    return f"1:{ratio[1]:g}"


# ---------------------------------------------------------------- blocks

def where(result):
    """One line: what ran, where and when, from provenance.json."""
    p = provenance(result)
    return (f"`{p['command']}`, commit {p['commit']}, {p['date']}, {p['machine']['cpu']}, "
            f"threads {p['threads']}, wall time {p['wall_time']}")


def headline():
    fine, coarse = ("study_regime1", "fine", "last", "oversampling"), ("study_regime1", "coarse", "last", "oversampling")
    tf, _, _ = comparison(*fine)
    tc, _, _ = comparison(*coarse)
    t2, _, _ = comparison("study_regime2", "fine", "last", "oversampling")
    pf, pc = tf[("proposed", R001, "balanced_accuracy")], tc[("proposed", R001, "balanced_accuracy")]
    p2 = t2[("proposed", R0005, "minority")]
    c2 = cells("study_regime2", "fine", "last")
    cf = cells("study_regime1", "fine", "last")
    mino = f"acc[{classes('study_regime1', 'fine')[-1]}]"
    pp, po = paper_value("fine", "proposed", R0005), paper_value("fine", "oversampling", R0005)
    both_ns = pf["verdict"] == "n.s." and pc["verdict"] == "n.s."
    ruled_out = max(pf["ci_high"], pc["ci_high"])
    base = tf[("baseline", R001, "minority")]
    loss = [tf[(m, R001, "balanced_accuracy")] for m in LOSS_REMEDIES]
    behind = sum(r["verdict"] == "worse" for r in loss)
    lines = [
        ("- **The paper's method does not beat oversampling alone.**" if both_ns and pf["mean_diff"] <= 0.01
         else "- **The paper's method against oversampling alone:**")
        + f" From scratch (regime 1: 3 epochs, 32 px, 600 majority images), at 1:0.01 its balanced accuracy minus "
        f"oversampling's is {diff(pf)} with Shirt as the rare class and {diff(pc)} with Trouser "
        f"(mean [95% CI], {pf['n_pairs']} paired runs each; {'neither significant' if both_ns else 'see the verdicts'}): "
        f"both 95% intervals exclude a gain above {ruled_out:+.3f}.",
        f"- **The paper's own cell, 1:0.005, is {'not ' if p2['verdict'] != 'better' else ''}reproduced.** "
        f"Fine-tuning a ResNet-18 pretrained on seven other Fashion-MNIST classes (regime 2: 20 epochs; a stand-in "
        f"for ImageNet weights, which cannot be downloaded here), with 3 shirts among 600 T-shirts, the proposed "
        f"method finds {ms(c2['proposed'][R0005], mino)} of the shirts and oversampling "
        f"{ms(c2['oversampling'][R0005], mino)} (the paper, roe deer at 224 px: {pp:.3f} and {po:.3f}); "
        f"paired difference in Shirt accuracy {diff(p2)}, {p2['n_pairs']} pairs.",
        ("- **From scratch, rebalancing the sampler is what rescues the rare class.**" if base["verdict"] == "worse"
         and behind else "- **Rebalancing the sampler against the loss-based remedies:**")
        + f" At 1:0.01 cross-entropy alone "
        f"finds {ms(cf['baseline'][R001], mino)} of the shirts, oversampling {ms(cf['oversampling'][R001], mino)} "
        f"({diff(base)}); {behind} of the {len(loss)} loss-based remedies (focal, class-balanced, LDAM-DRW, logit "
        f"adjustment) are significantly behind oversampling in balanced accuracy "
        f"({min(r['mean_diff'] for r in loss):+.3f} to {max(r['mean_diff'] for r in loss):+.3f}). "
        + regime2_remedy(t2),
    ]
    return "\n".join(lines) + "\n"


def regime2_remedy(t2):
    """One sentence on the best loss-based remedy against oversampling at regime 2's 1:0.005."""
    rows = {m: t2[(m, R0005, "balanced_accuracy")] for m in LOSS_REMEDIES if (m, R0005, "balanced_accuracy") in t2}
    best = max(rows, key=lambda m: rows[m]["mean_diff"])
    r, rm, rj = rows[best], t2[(best, R0005, "minority")], t2[(best, R0005, "majority")]
    where = "ahead of" if r["mean_diff"] > 0 else "behind"
    sig = "significantly " if r["verdict"] != "n.s." else ""
    after = "" if sig else ", not significant after Holm's correction"
    return (f"With the backbone and 20 epochs at 1:0.005, {NAMES[best]} is {sig}{where} oversampling in balanced "
            f"accuracy ({diff(r)}{after}): it finds more shirts ({diff(rm, ci=False)}) and gets fewer T-shirts "
            f"right ({diff(rj, ci=False)}).")


def headline_figure(path):
    """Each method minus oversampling in balanced accuracy, 95% interval, in the three cells of the headline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("study_regime1", "fine", R001, "regime 1, Shirt 1:0.01"),
              ("study_regime1", "coarse", R001, "regime 1, Trouser 1:0.01"),
              ("study_regime2", "fine", R0005, "regime 2, Shirt 1:0.005")]
    methods = [m for m, _, _ in load("study_regime1", "fine", "last") if m != "oversampling"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), sharey=True)
    for ax, (result, cond, ratio, title) in zip(axes, panels):
        table, _, _ = comparison(result, cond, "last", "oversampling")
        for y, m in enumerate(methods):
            r = table.get((m, ratio, "balanced_accuracy"))
            if r is None:
                continue
            colour = {"better": "tab:green", "worse": "tab:red"}.get(r["verdict"], "tab:gray")
            ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=colour, lw=2)
            ax.plot(r["mean_diff"], y, "o", color=colour, mfc=colour if r["verdict"] != "n.s." else "white")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("balanced accuracy minus oversampling's")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(methods)))
    axes[0].set_yticklabels(methods)
    axes[0].invert_yaxis()
    fig.suptitle("Each method minus oversampling, paired runs, mean and 95% interval, last epoch "
                 "(green/red: significant after Holm; grey: not)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def demo_table(cond):
    return report.markdown_table(list(load("demo", cond)), classes("demo", cond)[-1], paper(cond), "train_acc")


def summary_rows(result, cond, select, ratios, with_paper=False):
    """The table's lines: per method, balanced, minority and majority accuracy (mean ± std over the runs)
    per ratio, the epoch the rule chose in each run of the last ratio (by seed), and with_paper the
    paper's Table 1 value per ratio ('–' where it has none)."""
    cls = classes(result, cond)
    keys = [("balanced_accuracy", "balanced"), (f"acc[{cls[-1]}]", cls[-1]), (f"acc[{cls[0]}]", cls[0])]
    head = [f"{what} {label(r)}" for _, what in keys for r in ratios] + [f"epochs chosen {label(ratios[-1])}"]
    head += [f"paper {label(r)}" for r in ratios] if with_paper else []
    out = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, c in cells(result, cond, select).items():
        if not all(r in c for r in ratios):
            continue
        vals = [ms(c[r], k) for k, _ in keys for r in ratios] + [epochs_by_seed(c[ratios[-1]])]
        if with_paper:
            vals += ["–" if v is None else f"{v:.3f}" for v in (paper_value(cond, name, r) for r in ratios)]
        out.append(f"| {name} | " + " | ".join(vals) + " |")
    return out


def summary_table(result, cond, select, ratios):
    n = {e["summary"]["n_runs"] for c in cells(result, cond, select).values() for e in c.values()}
    return (f"Mean ± sample std over {'/'.join(map(str, sorted(n)))} runs per cell on the 2,000 test images; "
            f"the last column lists the epoch each run was read at, by seed.\n\n"
            + "\n".join(summary_rows(result, cond, select, ratios)) + "\n")


def compare_table(result, cond, select, reference):
    table, rows, notes = comparison(result, cond, select, reference)
    cls = classes(result, cond)
    text = report.comparison_markdown(rows, reference, 0.05, cls[-1], cls[0], notes, select)
    return re.sub(r"^### (.*)$", r"**\1**", text, flags=re.M).rstrip("\n") + "\n"


def rules_table():
    """Proposed and oversample+supcon minus oversampling, balanced accuracy, every condition and rule."""
    out = ["| condition | rule | proposed 1:0.1 | proposed 1:0.01 | oversample+supcon 1:0.1 | oversample+supcon 1:0.01 |",
           "|---|---|---|---|---|---|"]
    for cond in ("fine", "coarse"):
        for rule, _ in RULES:
            table, _, _ = comparison("study_regime1", cond, rule, "oversampling")
            vals = [f"{diff(table[(m, r, 'balanced_accuracy')])} {verdict(table[(m, r, 'balanced_accuracy')])}"
                    for m in ("proposed", "oversample+supcon") for r in (R01, R001)]
            out.append(f"| {cond} | `{rule}` | " + " | ".join(vals) + " |")
    fam = family("study_regime1", "fine", "last", "oversampling")
    return ("Balanced accuracy minus oversampling's, paired by run: mean [95% t-interval], Holm p over the "
            f"{fam} cells of each table (every method x 2 ratios), 10 pairs each.\n\n" + "\n".join(out) + "\n")


def regime2_table():
    """Per rule, every method's balanced, Shirt and T-shirt accuracy at each ratio of results/study_regime2
    and the epochs chosen at the most imbalanced, with the paper's Table 1 value (roe deer) where it has one."""
    ratios = tuple(report.ratio_order(cells("study_regime2", "fine")["oversampling"]))
    out = []
    for rule, text in RULES:
        out += [f"Under {text}:", ""] + summary_rows("study_regime2", "fine", rule, ratios, with_paper=True) + [""]
    return ("Mean ± sample std over 10 runs per cell on the 2,000 test images; the epochs chosen are each run's, "
            "by seed; the paper's columns are its Table 1 (roe deer among water deer, 224 px, 100 epochs from "
            "ImageNet weights).\n\n" + "\n".join(out))


STABILITY_KEYS = ("fine_oversampling", "fine_proposed", "fine_diff", "fine_cb_minority", "coarse_diff")


def stability_now():
    """The stability table's row of results/study_regime1."""
    fine, coarse = cells("study_regime1", "fine", "last"), cells("study_regime1", "coarse", "last")
    tf, _, _ = comparison("study_regime1", "fine", "last", "oversampling")
    tc, _, _ = comparison("study_regime1", "coarse", "last", "oversampling")
    pf, pc = tf[("proposed", R001, "balanced_accuracy")], tc[("proposed", R001, "balanced_accuracy")]
    cls = classes("study_regime1", "fine")
    p = provenance("study_regime1")
    return {"date": p["date"], "commit": p["commit"], "machine": p["machine"]["cpu"] + ", kernels capped at AVX2",
            "change": "results/study_regime1 (the run of record)",
            "fine_oversampling": f"{mean(fine['oversampling'][R001], 'balanced_accuracy'):.3f}",
            "fine_proposed": f"{mean(fine['proposed'][R001], 'balanced_accuracy'):.3f}",
            "fine_diff": f"{pf['mean_diff']:+.3f} (Holm {pf['p_holm']:.2f})",
            "fine_cb_minority": f"{mean(fine['cb'][R001], f'acc[{cls[-1]}]'):.3f}",
            "coarse_diff": f"{pc['mean_diff']:+.3f} (Holm {pc['p_holm']:.2f})"}


def stability():
    path = os.path.join(RESULTS, "stability.csv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    rows.append(stability_now())
    out = ["| date | commit | machine | what changed | fine: oversampling | fine: proposed | fine: proposed - "
           "oversampling | fine: cb, Shirt accuracy | coarse: proposed - oversampling |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['date']} | {r['commit']} | {r['machine']} | {r['change']} | "
                   + " | ".join(r[k] for k in STABILITY_KEYS) + " |")
    out += ["", "Where each earlier row was read (results/stability.csv; their per-run files were not kept):", ""]
    out += [f"- {r['date']}, {r['commit']}: {r['source']}" for r in rows if r.get("source")]
    return "\n".join(out) + "\n"


def verbatim(path):
    with open(os.path.join(RESULTS, path), encoding="utf-8") as f:
        return f.read()


BLOCKS = {
    "headline": headline,
    "headline_where": lambda: f"Regime 1: {where('study_regime1')}. Regime 2: {where('study_regime2')}.\n",
    "demo_where": lambda: where("demo") + ".\n",
    "demo_fine": lambda: demo_table("fine"),
    "demo_coarse": lambda: demo_table("coarse"),
    "regime1_where": lambda: where("study_regime1") + ".\n",
    "regime1_rules": rules_table,
    "regime1_fine_last": lambda: summary_table("study_regime1", "fine", "last", (R01, R001)),
    "regime1_fine_train_acc": lambda: summary_table("study_regime1", "fine", "train_acc", (R01, R001)),
    "regime1_fine_compare": lambda: compare_table("study_regime1", "fine", "last", "oversampling"),
    "regime1_coarse_last": lambda: summary_table("study_regime1", "coarse", "last", (R01, R001)),
    "regime1_coarse_train_acc": lambda: summary_table("study_regime1", "coarse", "train_acc", (R01, R001)),
    "regime1_coarse_compare": lambda: compare_table("study_regime1", "coarse", "last", "oversampling"),
    "regime2_where": lambda: where("study_regime2") + ".\n",
    "regime2_table": regime2_table,
    "regime2_compare": lambda: compare_table("study_regime2", "fine", "last", "oversampling"),
    "regime2_2026_11_30": lambda: verbatim(os.path.join("study_regime2_2026-11-30", "tables.md")),
    "stability": stability,
}


# ---------------------------------------------------------------- the docs

def render(text, path="the page"):
    """text with every generated block re-rendered; UserError for a block of no known name."""
    def one(m):
        name = m.group("name")
        if name not in BLOCKS:
            raise UserError(f"{path}: <!-- record:{name} --> names no block; known: {' '.join(BLOCKS)}")
        return f"<!-- record:{name} -->\n{BLOCKS[name]()}<!-- /record:{name} -->"
    return BLOCK.sub(one, text)


def update_docs(check=False, root=HERE):
    """Re-render the blocks of DOCS (and, unless check, the figures drawn from results/: the headline's,
    the study's paired differences, the demo's Figure 3) -> [(path, names of the blocks that differed)]."""
    changed = []
    for rel in DOCS:
        path = os.path.join(root, rel)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = render(text, rel)
        if new != text:
            old = {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}
            changed.append((rel, [m.group("name") for m in BLOCK.finditer(new) if old.get(m.group("name")) != m.group("body")]))
            if not check:
                write_text_atomic(path, new)
    if not check:
        headline_figure(os.path.join(root, FIGURE))
        _, rows, _ = comparison("study_regime1", "fine", "last", "oversampling")
        report.comparison_figure(rows, "oversampling", os.path.join(root, STUDY_FIGURE))
        for cond in ("fine", "coarse"):
            report.figure(list(load("demo", cond)), classes("demo", cond), os.path.join(root, DEMO_FIGURE.format(cond)))
    return changed
