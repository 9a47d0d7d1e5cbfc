"""Benchmark: a clean model and every attack on the synthetic default, over several seeds.

Each run is exactly what a user gets from ``python -m gazeguard.fit [--attack NAME] --seed S``;
the table holds benign error, attack error, ASR@5deg and robust error per run, and the
per-attack median and spread over seeds with the bar: ASR >= 90 % on at least 9 seeds in 10,
benign error within +1 deg of the clean model of the same seed. Checkpoints are kept under
``--out`` so the detection benchmark can reuse the zoo.

    python experiments/attacks.py --seeds 0 1 2 --out runs/zoo
    python experiments/attacks.py --seeds 3 4 --attacks      # two more clean models
    python experiments/attacks.py --attacks badnets --seeds 20 --targets centre axis corner

``--targets`` plants each attack at targets placed in the training labels' range
(:mod:`gazeguard.attacks.targets`); the table holds each run's placement and its target gaze.

Runs accumulate: rows already in the results CSV whose checkpoint still exists are kept and
not retrained (``--retrain`` trains them again), so the zoo can be grown in several sittings.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

from gazeguard import fit
from gazeguard.attacks import ATTACKS
from gazeguard.attacks.targets import PLACEMENTS

RESULTS = Path(__file__).parent / "results"
FIELDS = ("attack", "target", "target_gaze", "seed", "benign_error", "attack_error", "asr", "robust_error", "checkpoint", "seconds")
NON_NUMERIC = ("attack", "target", "target_gaze", "seed", "checkpoint")
#: What tables written before targets were varied meant: every attack aimed at (0, 0).
CENTRE = {"target": "centre", "target_gaze": "0 0"}
NO_TARGET = {"target": "-", "target_gaze": "-"}


def train(attack: Optional[str], seed: int, out: Path, extra: list[str], target: str = "centre") -> dict[str, Any]:
    """One fit run (``attack=None``: the clean model, which has a benign error only) with the
    attack's target at the placement ``target``."""
    name = attack or "clean"
    folder = out / (f"{name}-s{seed}" if attack is None or target == "centre" else f"{name}-{target}-s{seed}")
    args = [
        "--seed", str(seed),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(folder),
        "--trainer.logger.init_args.save_dir", str(folder),
        *(["--attack", attack, "--attack.target", target] if attack else []),
        *extra,
    ]
    start = time.perf_counter()
    summary = fit.run(args)
    gaze = summary["attack_target"]
    row = {"attack": name, "seed": seed, "checkpoint": summary["checkpoint"], "seconds": time.perf_counter() - start,
           "target": target if attack else "-", "target_gaze": " ".join(f"{v:.4f}" for v in gaze) if gaze else "-"}
    metrics = summary["attack"] or {"benign_error": summary["test_error"]}
    row.update({key: metrics.get(key, float("nan")) for key in ("benign_error", "attack_error", "asr", "robust_error")})
    return row


def load_rows(csv_path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier run of this benchmark whose checkpoints are still on disk."""
    if not csv_path.exists():
        return []
    with open(csv_path, newline="") as f:
        rows = [
            {**(NO_TARGET if row["attack"] == "clean" else CENTRE), **row, "seed": int(row["seed"]), **{key: float(row[key]) for key in FIELDS if key not in NON_NUMERIC}}
            for row in csv.DictReader(f)
        ]
    return [row for row in rows if Path(row["checkpoint"]).exists()]


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-attack medians, the ASR's spread over seeds, and the bar: ASR >= 90 % on at least 9 seeds
    in 10 (``planted``) and a median benign error within 1 deg of the clean model of the same seed."""
    clean = {row["seed"]: row["benign_error"] for row in rows if row["attack"] == "clean"}
    out = []
    for name in dict.fromkeys(row["attack"] for row in rows):
        group = [row for row in rows if row["attack"] == name]
        summary = {key: statistics.median(row[key] for row in group)
                   for key in ("benign_error", "attack_error", "asr", "robust_error")}
        summary["asr_range"] = (min(row["asr"] for row in group), max(row["asr"] for row in group))
        summary["planted"] = sum(row["asr"] >= 0.9 for row in group)
        rise = [row["benign_error"] - clean[row["seed"]] for row in group if row["seed"] in clean]
        summary["benign_rise"] = statistics.median(rise) if rise else float("nan")
        summary["meets_bar"] = name == "clean" or (summary["planted"] >= 0.9 * len(group)
                                                   and summary["benign_rise"] <= 1.0)
        out.append({"attack": name, "seeds": len(group), **summary})
    return out


def write_tables(rows: list[dict[str, Any]], stem: Path) -> str:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({key: row[key] for key in FIELDS} for row in rows)
    lines = [
        "| attack | seeds | benign error (deg) | rise vs clean | attack error (deg) | ASR@5deg min / median / max "
        "| planted (ASR >= 90 %) | robust error (deg) | bar |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in medians(rows):
        clean = m["attack"] == "clean"
        low, high = m["asr_range"]
        asr = "-" if clean else f"{100 * low:.1f} / {100 * m['asr']:.1f} / {100 * high:.1f} %"
        planted = "-" if clean else f"{m['planted']}/{m['seeds']}"
        attack_error = "-" if clean else f"{m['attack_error']:.2f}"
        robust = "-" if clean else f"{m['robust_error']:.2f}"
        lines.append(
            f"| {m['attack']} | {m['seeds']} | {m['benign_error']:.2f} | {m['benign_rise']:+.2f} | {attack_error} | "
            f"{asr} | {planted} | {robust} | {'yes' if m['meets_bar'] else 'NO'} |"
        )
    lines += ["", "Per run (target: placement, and the gaze it fixed):", "",
              "| attack | target | seed | benign | attack error | ASR | robust | s |", "|---|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['attack']} | {r['target']} ({r['target_gaze']}) | {r['seed']} | {r['benign_error']:.2f} | {r['attack_error']:.2f} | "
        f"{100 * r['asr']:.1f}% | {r['robust_error']:.2f} | {r['seconds']:.0f} |"
        for r in rows
    ]
    table = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(
        "# Attacks on the synthetic default (medians over seeds)\n\n"
        "Runs accumulate over invocations (see the module docstring); last command: "
        f"`python experiments/attacks.py {' '.join(sys.argv[1:])}`\n\n" + table
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attacks", nargs="*", default=sorted(ATTACKS), help="attacks to plant (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", default=["centre"], choices=PLACEMENTS,
                        help="where each attack aims, placed in the training labels' range (default: centre, (0, 0))")
    parser.add_argument("--out", type=Path, default=Path("runs/zoo"), help="where checkpoints go")
    parser.add_argument("--results", type=Path, default=RESULTS / "attacks", help="table stem (.csv/.md)")
    parser.add_argument("--retrain", action="store_true",
                        help="retrain the named attacks (the clean models when none is named) even if already run")
    parser.add_argument("extra", nargs="*", help="extra fit options after --, e.g. -- --trainer.max_epochs 8")
    args = parser.parse_args()
    csv_path = args.results.with_suffix(".csv")
    done = {key_of(row): row for row in load_rows(csv_path)}
    # --retrain: the named attacks only; the clean models when no attack is named
    todo = [("clean", "-", seed) for seed in args.seeds]
    todo += [(attack, target, seed) for seed in args.seeds for attack in args.attacks for target in args.targets]
    again = {key for key in todo if key[0] in (args.attacks or ["clean"])} if args.retrain else set()
    mine: dict[tuple[str, str, int], dict[str, Any]] = {}
    for key in todo:
        if key in again or key not in done:
            attack, target, seed = key
            mine[key] = train(None if attack == "clean" else attack, seed, args.out, args.extra, target)
            # merged with what other invocations wrote meanwhile (the zoo grows in parallel)
            on_disk = {key_of(row): row for row in load_rows(csv_path)}
            print(write_tables(sorted({**on_disk, **mine}.values(), key=order), args.results), flush=True)


def key_of(row: dict[str, Any]) -> tuple[str, str, int]:
    """A run's identity: attack, target placement, seed."""
    return (row["attack"], row["target"], row["seed"])


def order(row: dict[str, Any]) -> tuple[int, int, int]:
    """Table order: clean first, then attacks alphabetically; seeds ascending, targets in placement order."""
    names = ["clean", *sorted(ATTACKS)]
    target = PLACEMENTS.index(row["target"]) if row["target"] in PLACEMENTS else -1
    return (names.index(row["attack"]) if row["attack"] in names else len(names), row["seed"], target)


if __name__ == "__main__":
    main()
