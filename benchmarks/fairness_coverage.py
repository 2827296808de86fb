"""Coverage of the fairness-gap intervals and size of the permutation test, by seeded simulation.

Truth is set directly: a confusion-matrix distribution per group. Each replicate draws every group's counts
(multinomial, group sizes fixed) and runs the evaluator's own path (``gap_inference``: within-group bootstrap,
bounded-root interval, bias correction, permutation chance level). Per setting and gap it records, for the
bounded-root interval and for the percentile and basic (reverse-percentile) baselines computed from the same
resamples: coverage, the two one-sided miss rates (truth below L = "low miss", above U = "high miss"), median width,
the share of intervals containing the plug-in and the bias-corrected estimate, and, where the true gap is 0, the
permutation test's rejection rate at α = 0.05.

Settings (statistics.md §A7): accuracy gaps (max gap, worst group, min/max ratio) on a 2-class problem with true
accuracy ≈ 0.75 — all tied, a linear spread of 0.05, two clusters (±0.03), one group lower by 3 or 6 standard errors
of a mid-size group — for 2, 8 and 24 groups of 30, 100, 500 or 2,000 images, or sizes spread geometrically from 30
to 2,000; and the per-class gaps (demographic parity, equal opportunity, equalized odds, overall disparity) on 7
classes with true recall 0.75 — tied, a spread of 0.05, one group's recall of one class 6 points lower — for 4 and
12 groups of 100 or 500 images, or 140 to 2,000.

Targets (issue 12): coverage ≥ 93 % and each one-sided miss ≤ 3.5 % at nominal 95 % wherever every group has
≥ 100 images; coverage ≤ 98 % only where the extreme groups are well separated (≥ 4 SE from the runners-up);
permutation rejection at a true gap of 0 ≤ 5 % + 2 Monte Carlo SE; the interval always contains both estimates.

    .venv/bin/python benchmarks/fairness_coverage.py [--replicates 800] [--replicates-small 200]
        [--class-replicates 500] [--bootstrap 1000] [--workers 2] [--quick]
        [--out benchmarks/results/fairness_coverage.md]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from fer_bench.eval.bootstrap import resample_within
from fer_bench.eval.fairness import GAP_DEFINITIONS, gap_value, rate_counts, rates
from fer_bench.eval.fairness_inference import gap_inference

ACCURACY_GAPS = ("max_gap", "worst_group_acc", "min_max_ratio")
CLASS_GAPS = ("dem_parity_gap", "eq_opp_gap", "eq_odds_gap", "overall_disparity")
LEVEL = 0.95


@dataclass
class Setting:
    name: str
    sizes: np.ndarray  # [G]
    truth: np.ndarray  # [G, K, K] cell probabilities per group
    keys: tuple[str, ...]
    separated: bool  # extreme groups ≥ 4 SE from the runners-up: over-coverage is a failure here


def _sizes(groups: int, size: str) -> np.ndarray:
    if size == "mixed":
        return np.round(np.geomspace(30, 2000, groups)).astype(int)
    return np.full(groups, int(size))


def _binary(acc: np.ndarray) -> np.ndarray:
    """[G, 2, 2] cell probabilities with accuracy ``acc`` per group and balanced classes."""
    out = np.empty((len(acc), 2, 2))
    out[:, 0, 0] = out[:, 1, 1] = acc / 2
    out[:, 0, 1] = out[:, 1, 0] = (1 - acc) / 2
    return out


def _seven(recall: np.ndarray) -> np.ndarray:
    """[G, 7, 7] cell probabilities from per-group per-class recall [G, 7]; errors spread evenly; classes equal."""
    g, k = recall.shape
    out = np.repeat(((1 - recall) / (k - 1))[:, :, None], k, axis=2)
    idx = np.arange(k)
    out[:, idx, idx] = recall
    return out / k


def accuracy_settings(groups_list: tuple[int, ...], sizes_list: tuple[str, ...]) -> list[Setting]:
    out = []
    for groups in groups_list:
        for size in sizes_list:
            n = _sizes(groups, size)
            se_mid = math.sqrt(0.75 * 0.25 / float(np.median(n)))
            configs = {
                "tied": (np.full(groups, 0.75), False),
                "spread .05": (np.linspace(0.725, 0.775, groups), False),
                "two clusters": (np.where(np.arange(groups) % 2 == 0, 0.78, 0.72), False),
                "one low 3 SE": (np.r_[0.75 - 3 * se_mid, np.full(groups - 1, 0.75)], False),
                "one low 6 SE": (np.r_[0.75 - 6 * se_mid, np.full(groups - 1, 0.75)], groups == 2),
            }
            for name, (acc, separated) in configs.items():
                out.append(Setting(f"acc {name}, {groups} × {size}", n, _binary(acc), ACCURACY_GAPS, separated))
    return out


def class_settings(groups_list: tuple[int, ...], sizes_list: tuple[str, ...]) -> list[Setting]:
    out = []
    for groups in groups_list:
        for size in sizes_list:
            n = _sizes(groups, size) if size != "mixed" else np.round(np.geomspace(140, 2000, groups)).astype(int)
            tied = np.full((groups, 7), 0.75)
            spread = tied + np.linspace(-0.025, 0.025, groups)[:, None]
            low = tied.copy()
            low[0, 3] -= 0.06
            for name, recall in {"tied": tied, "spread .05": spread, "one group −6 pt on one class": low}.items():
                out.append(Setting(f"class {name}, {groups} × {size}", n, _seven(recall), CLASS_GAPS, False))
    return out


def _baselines(key: str, cm: np.ndarray, value: float, *, n_bootstrap: int, seed: int) -> dict[str, tuple]:
    """Percentile and basic intervals from the same within-group resamples gap_inference draws (same seed)."""
    replicates = resample_within(cm, n_resamples=n_bootstrap, seed=seed)
    kind, functional, _ = GAP_DEFINITIONS[key]
    boot = functional(rates(*rate_counts(replicates, kind)))
    boot = boot[~np.isnan(boot)]
    if not boot.size:
        return {}
    lo, hi = np.quantile(boot, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return {"percentile": (lo, hi), "basic": (2 * value - hi, 2 * value - lo)}


def run_setting(setting: Setting, *, replicates: int, n_bootstrap: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    truth = {key: float(gap_value(setting.truth, key)) for key in setting.keys}
    # the permutation null holds where the compared rate does not depend on the group: a gap of 0 (for the worst
    # group and the ratio, an accuracy gap of 0)
    null = {key: float(gap_value(setting.truth, "max_gap" if key in ACCURACY_GAPS else key)) < 1e-12 for key in truth}
    tally: dict[tuple[str, str], dict[str, list]] = {}
    rejections = {key: [] for key in setting.keys}
    for r in range(replicates):
        cm = np.stack(
            [
                rng.multinomial(n, p.ravel() / p.sum()).reshape(p.shape)
                for n, p in zip(setting.sizes, setting.truth, strict=True)
            ]
        )
        boot_seed = seed * 100_003 + r
        out = gap_inference(
            cm,
            eligible=np.ones(len(cm), bool),
            n_bootstrap=n_bootstrap,
            n_permutations=n_bootstrap,
            seed=boot_seed,
            level=LEVEL,
            keys=setting.keys,
        )
        for key in setting.keys:
            entry = out[key]
            if entry["ci"] is None:
                continue
            intervals = {"bounded-root": tuple(entry["ci"])}
            intervals |= _baselines(key, cm, entry["value"], n_bootstrap=n_bootstrap, seed=boot_seed)
            for method, (lo, hi) in intervals.items():
                t = tally.setdefault((key, method), {"low": [], "high": [], "width": [], "contains": []})
                t["low"].append(truth[key] < lo - 1e-12)
                t["high"].append(truth[key] > hi + 1e-12)
                t["width"].append(hi - lo)
                t["contains"].append(lo <= entry["value"] <= hi and lo <= (entry["corrected"] or entry["value"]) <= hi)
            if entry["chance"] is not None:
                rejections[key].append(entry["chance"]["p_value"] <= 0.05)
    rows = []
    for (key, method), t in tally.items():
        count = len(t["low"])
        low, high = float(np.mean(t["low"])), float(np.mean(t["high"]))
        rows.append(
            {
                "setting": setting.name,
                "gap": key,
                "method": method,
                "truth": truth[key],
                "replicates": count,
                "coverage": 1 - low - high,
                "low_miss": low,
                "high_miss": high,
                "width": float(np.median(t["width"])),
                "contains": float(np.mean(t["contains"])),
                "reject_at_0": float(np.mean(rejections[key])) if null[key] and rejections[key] else None,
                "min_size": int(setting.sizes.min()),
                "separated": setting.separated,
            }
        )
    return rows


def _beyond(observed: float, target: float, n: int, *, above: bool) -> tuple[bool, bool]:
    """(past the target, past it by more than 2 Monte Carlo standard errors of a rate ``target`` over ``n``)."""
    se = math.sqrt(target * (1 - target) / max(n, 1))
    excess = observed - target if above else target - observed
    return excess > 1e-12, excess > 2 * se


def check(row: dict, replicates: int) -> tuple[list[str], list[str]]:
    """The issue's targets for the bounded-root rows (the baselines are reported, not judged): the targets missed
    by more than Monte Carlo error (2 SE at ``replicates``), and those missed within it."""
    if row["method"] != "bounded-root":
        return [], []
    failed, within = [], []

    def judge(text: str, observed: float, target: float, *, above: bool) -> None:
        past, clearly = _beyond(observed, target, replicates, above=above)
        if clearly:
            failed.append(text)
        elif past:
            within.append(text)

    if row["contains"] < 1.0:
        failed.append("an interval misses a reported estimate")
    if row["min_size"] >= 100:
        judge(f"coverage {row['coverage']:.3f} < 0.93", row["coverage"], 0.93, above=False)
        judge(f"low miss {row['low_miss']:.3f} > 0.035", row["low_miss"], 0.035, above=True)
        judge(f"high miss {row['high_miss']:.3f} > 0.035", row["high_miss"], 0.035, above=True)
        if row["separated"]:
            judge(f"coverage {row['coverage']:.3f} > 0.98 with separated extremes", row["coverage"], 0.98, above=True)
    if row["reject_at_0"] is not None:
        judge(f"rejection at gap 0 {row['reject_at_0']:.3f} > 0.05", row["reject_at_0"], 0.05, above=True)
    return failed, within


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicates", type=int, default=800, help="per accuracy setting with groups >= 100")
    parser.add_argument("--replicates-small", type=int, default=200, help="per setting with a group under 100")
    parser.add_argument("--class-replicates", type=int, default=500, help="per 7-class setting")
    parser.add_argument("--workers", type=int, default=1, help="processes (settings run in parallel)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples and permutations")
    parser.add_argument("--quick", action="store_true", help="a few settings, to try the script")
    parser.add_argument("--only", default="", help="run the settings whose name contains this text")
    parser.add_argument("--out", default="benchmarks/results/fairness_coverage.md")
    args = parser.parse_args()
    if args.quick:
        settings = accuracy_settings((2, 8), ("100",)) + class_settings((4,), ("100",))
    else:
        settings = accuracy_settings((2, 8, 24), ("30", "100", "500", "2000", "mixed"))
        settings += class_settings((4, 12), ("100", "500", "mixed"))

    settings = [setting for setting in settings if args.only in setting.name]

    def replicates_for(setting: Setting) -> int:
        if setting.sizes.min() < 100:
            return args.replicates_small
        return args.class_replicates if setting.keys == CLASS_GAPS else args.replicates

    started = time.perf_counter()
    lines = [
        f"# Fairness-gap intervals: coverage at nominal 95 % ({args.replicates} replicates per accuracy setting "
        f"with groups ≥ 100, {args.replicates_small} with smaller groups, {args.class_replicates} per 7-class "
        f"setting; {args.bootstrap} resamples and permutations each)",
        "",
        "low miss = truth below the interval; high miss = truth above it; contains = share of intervals holding the "
        "plug-in and the bias-corrected estimate; reject@0 = permutation test's rejection rate at α = 0.05 where the "
        "true gap is 0. Targets apply to bounded-root rows where every group has ≥ 100 images.",
        "",
        "| setting | gap | method | true gap | coverage | low miss | high miss | median width | contains | "
        "reject@0 | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    failures = within_mc = 0
    pooled: dict = {}
    # seeded by the setting's name, so --only reproduces the rows of a full run
    jobs = [(s, replicates_for(s), args.bootstrap, zlib.crc32(s.name.encode())) for s in settings]
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        results = pool.map(_run_job, jobs)
        for index, (setting, rows) in enumerate(zip(settings, results, strict=True)):
            elapsed = time.perf_counter() - started
            print(f"[{index + 1}/{len(settings)}] {setting.name} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
            failed, within = _table_rows(lines, rows, replicates_for(setting), pooled)
            failures, within_mc = failures + failed, within_mc + within
    lines += _pooled_lines(pooled)
    lines += [
        "",
        f"Rows missing a target by more than Monte Carlo error (2 SE): {failures}; past a target but within Monte "
        f"Carlo error: {within_mc}. Took {time.perf_counter() - started:.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from fer_bench._io import atomic_write_text

        atomic_write_text(args.out, text)
    return 1 if failures else 0


def _run_job(job: tuple) -> list[dict]:
    setting, replicates, n_bootstrap, seed = job
    return run_setting(setting, replicates=replicates, n_bootstrap=n_bootstrap, seed=seed)


def _table_rows(lines: list[str], rows: list[dict], replicates: int, pooled: dict) -> tuple[int, int]:
    failures = within_mc = 0
    for row in rows:
        failed, within = check(row, replicates)
        failures += bool(failed)
        within_mc += bool(within) and not failed
        if failed:
            verdict = "FAILS: " + "; ".join(failed)
        elif within:
            verdict = "within MC error: " + "; ".join(within)
        else:
            verdict = "ok" if row["method"] == "bounded-root" else ""
        reject = "" if row["reject_at_0"] is None else f"{row['reject_at_0']:.3f}"
        lines.append(
            f"| {row['setting']} | {row['gap']} | {row['method']} | {row['truth']:.4f} | {row['coverage']:.3f} | "
            f"{row['low_miss']:.3f} | {row['high_miss']:.3f} | {row['width']:.4f} | {row['contains']:.3f} | "
            f"{reject} | {verdict} |"
        )
        if row["method"] == "bounded-root":
            tally = pooled.setdefault(row["gap"], {"n": 0, "low": 0.0, "high": 0.0, "n0": 0, "reject": 0.0})
            if row["min_size"] >= 100:
                tally["n"] += row["replicates"]
                tally["low"] += row["low_miss"] * row["replicates"]
                tally["high"] += row["high_miss"] * row["replicates"]
            if row["reject_at_0"] is not None:
                tally["n0"] += row["replicates"]
                tally["reject"] += row["reject_at_0"] * row["replicates"]
    return failures, within_mc


def _pooled_lines(pooled: dict) -> list[str]:
    lines = [
        "",
        "## Pooled over the settings with groups ≥ 100 (bounded-root), and over the settings with a true gap of 0",
        "",
        "| gap | replicates | coverage | low miss | high miss | replicates at gap 0 | rejection at gap 0 (α = 0.05) |",
        "|---|---|---|---|---|---|---|",
    ]
    for gap, t in pooled.items():
        n, n0 = max(t["n"], 1), max(t["n0"], 1)
        reject = f"{t['reject'] / n0:.4f} ± {math.sqrt(0.05 * 0.95 / n0):.4f}" if t["n0"] else "–"
        lines.append(
            f"| {gap} | {t['n']} | {1 - (t['low'] + t['high']) / n:.4f} | {t['low'] / n:.4f} | {t['high'] / n:.4f} | "
            f"{t['n0']} | {reject} |"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
