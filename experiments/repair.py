"""Benchmark: SecureGaze's repair over model zoos, against the never-poisoned yardstick.

Every backdoored checkpoint of one or more zoo tables (``experiments/attacks.py``) goes through
exactly what ``fit --defense securegaze`` runs when training ends (:func:`gazeguard.defenses.run_defense`
on the same poisoned data module: detection, the repair when flagged, the check after repair),
once per detection seed. Beside each repaired model stands the clean model of the same training
seed from the same table, measured on the same triggered test faces: its robust error is what a
model that never saw a poison makes of those faces (a strip over an eye hides the gaze from any
model). The bars, per draw:

- ASR@5deg after repair <= 5 %;
- benign error after repair at most 0.5 deg above before;
- robust error after repair <= max(1.5 x the benign error after, the yardstick's robust error).

    python experiments/repair.py --zoo eye=experiments/results/attacks_eye.csv --detection-seeds 0

Runs accumulate like the detection benchmark's: draws already in the results CSV are kept
(``--redo`` judges them again). Models whose attack did not plant (ASR < 90 %) are skipped.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

from attacks import RESULTS, load_rows  # noqa: E402  (experiments/attacks.py)
from detection import PLANTED, defender_split, first_zoo_only, load_model, read_done, target_error  # noqa: E402

from gazeguard.attacks import PoisonedDataModule, evaluate_attack
from gazeguard.attacks.metrics import evaluator_for
from gazeguard.data import GazeDataModule
from gazeguard.defenses import DefenseData, SecureGazeConfig
from gazeguard.defenses.run import run_defense
from gazeguard.defenses.securegaze import SecureGazeDefense
from gazeguard.fit import DATA_DEFAULTS
from gazeguard.model import GazeRegressor

FIELDS = ("zoo", "attack", "placement", "attack_target", "seed", "detection_seed", "statistic", "flagged",
          "target_error", "route", "verification", "benign_before", "benign_after", "asr_before", "asr_after",
          "robust_before", "robust_after", "yardstick", "bars", "seconds")
ASR_BAR, BENIGN_BAR, ROBUST_FACTOR = 0.05, 0.5, 1.5


def poisoned_data(seed: int, attack: Any) -> PoisonedDataModule:
    """The poisoned data module ``fit --seed seed --attack ...`` trained on (fit's data defaults)."""
    options = {key.removeprefix("data."): value for key, value in DATA_DEFAULTS.items()}
    data = PoisonedDataModule(GazeDataModule(**{**options, "seed": seed}), attack)
    data.setup()
    return data


def judge(row: dict[str, Any], clean: Optional[dict[str, Any]], detection_seed: int) -> dict[str, Any]:
    """One draw: run the defense as fit does and measure the bars against the yardstick."""
    start = time.perf_counter()
    model, attack = load_model(row)
    data = poisoned_data(row["seed"], attack)
    defense = SecureGazeDefense(detection=SecureGazeConfig(seed=detection_seed))
    inputs = DefenseData(clean=defender_split(row["seed"]), train=data.split_dataset("train"))
    report = run_defense(defense, model, inputs, True, evaluator_for(data)).report
    yardstick = float("nan")
    if clean is not None:
        never = GazeRegressor.load_from_checkpoint(clean["checkpoint"], map_location="cpu").eval()
        yardstick = evaluate_attack(never, data)["robust_error"]
    detection, before, after = report["detection"], report["before"], report["after"] or {}
    repair = report["repair"] or {}
    out = {"attack": row["attack"], "placement": row["target"], "attack_target": row["target_gaze"],
           "seed": row["seed"], "detection_seed": detection_seed, "statistic": detection["score"],
           "flagged": detection["verdict"] == "backdoored",
           "target_error": target_error(detection["evidence"]["inferred_target"], row["target_gaze"]),
           "route": repair.get("method", "-"), "verification": (repair.get("verification") or {}).get("status", "-"),
           "benign_before": before["benign_error"], "asr_before": before["asr"], "robust_before": before["robust_error"],
           "benign_after": after.get("benign_error", float("nan")), "asr_after": after.get("asr", float("nan")),
           "robust_after": after.get("robust_error", float("nan")), "yardstick": yardstick,
           "seconds": time.perf_counter() - start}
    out["bars"] = bars(out)
    return out


def bars(d: dict[str, Any]) -> str:
    """Which repair bars a draw meets: ``asr``, ``benign``, ``robust`` (``-`` where no repair ran)."""
    if d["route"] in ("-", ""):
        return "-"
    benign_after = float(d["benign_after"])
    ceiling = max(ROBUST_FACTOR * benign_after, float(d["yardstick"]) if d["yardstick"] == d["yardstick"] else 0.0)
    met = {"asr": float(d["asr_after"]) <= ASR_BAR,
           "benign": benign_after - float(d["benign_before"]) <= BENIGN_BAR,
           "robust": float(d["robust_after"]) <= ceiling}
    return " ".join(name if ok else f"NO-{name}" for name, ok in met.items())


def _change(d: dict[str, Any], name: str, form: str) -> str:
    """``before -> after`` of one measure, or ``before`` alone where no repair ran."""
    before = form.format(float(d[f"{name}_before"]))
    return f"{before} -> {form.format(float(d[f'{name}_after']))}" if d["bars"] != "-" else before


def write_tables(draws: list[dict[str, Any]], stem: Path, command: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({key: d.get(key, "") for key in FIELDS} for d in draws)
    repaired = [d for d in draws if d["bars"] != "-"]
    all_met = [d for d in repaired if "NO-" not in d["bars"]]
    lines = [
        "# SecureGaze repair on the model zoos, against the never-poisoned yardstick", "",
        f"Command: `python experiments/repair.py {command}`.", "",
        f"Each draw is what `fit --defense securegaze` runs when training ends, on the model's own poisoned "
        f"training data. Bars: ASR@5deg after <= {100 * ASR_BAR:g} %, benign error after at most "
        f"{BENIGN_BAR:g} deg above before, robust error after <= max({ROBUST_FACTOR:g} x benign after, the "
        "yardstick), where the yardstick is the robust error of the clean model of the same training seed on "
        "the same triggered faces.", "",
        f"Repaired draws meeting all three bars: {len(all_met)} of {len(repaired)} "
        f"({len(draws) - len(repaired)} draws not repaired: not flagged, or no repair ran).", "",
        "| zoo | attack | target (rad) | seed | det. seed | statistic | target distance (deg) | route | check | "
        "benign before -> after | ASR before -> after | robust before -> after | yardstick | robust / benign | bars |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in draws:
        fixed = d["bars"] != "-"
        after = {key: float(d[key]) for key in ("benign_after", "asr_after", "robust_after")} if fixed else {}
        ratio = f"{after['robust_after'] / after['benign_after']:.2f}x" if fixed else "-"
        lines.append(
            f"| {d['zoo']} | {d['attack']} | {d['placement']} ({d['attack_target']}) | {d['seed']} | "
            f"{d['detection_seed']} | {float(d['statistic']):.3f} | {d['target_error'] or '-'} | {d['route']} | "
            f"{d['verification']} | {_change(d, 'benign', '{:.2f}')} | {_change(d, 'asr', '{:.1%}')} | "
            f"{_change(d, 'robust', '{:.2f}')} | {float(d['yardstick']):.2f} | {ratio} | {d['bars']} |")
    seconds = [float(d["seconds"]) for d in draws]
    lines += ["", "Wall time per draw (detection, repair, the check after it and the evaluations; 2 CPU cores, "
              f"shared with other runs): median {statistics.median(seconds):.0f} s, range {min(seconds):.0f}-{max(seconds):.0f} s."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", nargs="+", required=True, help="LABEL=CSV zoo tables of experiments/attacks.py")
    parser.add_argument("--detection-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--results", type=Path, default=RESULTS / "repair", help="table stem (.csv/.md)")
    parser.add_argument("--attacks", nargs="*", help="only these attacks (default: all)")
    parser.add_argument("--redo", action="store_true", help="judge draws judged by an earlier run again")
    args = parser.parse_args()
    done = {} if args.redo else read_done(args.results.with_suffix(".csv"))
    command = " ".join(sys.argv[1:])
    zoos = first_zoo_only([(label, load_rows(Path(table))) for label, table in (e.split("=", 1) for e in args.zoo)])
    for detection_seed in args.detection_seeds:
        for label, rows in zoos:
            clean = {row["seed"]: row for row in rows if row["attack"] == "clean"}
            for row in rows:
                key = (label, row["attack"], row["target"], row["seed"], detection_seed)
                if (row["attack"] == "clean" or float(row["asr"]) < PLANTED or key in done
                        or (args.attacks and row["attack"] not in args.attacks)):
                    continue
                done[key] = {"zoo": label, **judge(row, clean.get(row["seed"]), detection_seed)}
                print(f"{key}: {done[key]['bars']} ({done[key]['seconds']:.0f} s)", flush=True)
                write_tables(sorted(done.values(), key=order), args.results, command)


def order(d: dict[str, Any]) -> tuple:
    return (d["zoo"], d["attack"], d["seed"], d["placement"], d["detection_seed"])


if __name__ == "__main__":
    main()
