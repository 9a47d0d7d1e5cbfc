"""Benchmark: SecureGaze detection and repair over the attack benchmark's model zoo.

Every checkpoint listed in ``experiments/results/attacks.csv`` (clean models and every attack,
several seeds; grown with ``experiments/attacks.py``) is loaded and judged by
:func:`gazeguard.defenses.detect` on the defender's clean split of its own data (the split
``fit --defense securegaze`` uses). A model counts as *backdoored* when its attack reached
ASR@5deg >= 90 %; attacks that did not plant are listed but left out of the rates (they are
neither clean models nor working backdoors).

Calibration: SecureGaze's hyper-parameters are its defaults; the threshold is fixed on the models
of ``--calibration-seeds`` only (the geometric middle of the lowest clean and the highest
backdoored statistic there), or given with ``--threshold``. Rates are reported for the
calibration seeds, for ``--tuning-seeds`` (seeds whose models were looked at while the defaults
were chosen: which, and why, is in ``docs/securegaze.md``) and, separately, for the fresh ones,
which played no part in choosing anything.

With ``--repair``, each backdoored model is also repaired (:func:`gazeguard.defenses.repair_flagged`,
whatever the verdict, so that repair is measured on every planted backdoor) and measured with
its real trigger on the test split: benign error, ASR@5deg and robust error before and after.

    python experiments/detection.py --repair
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from attacks import RESULTS, load_rows  # noqa: E402  (experiments/attacks.py)
from torchmetrics.functional.classification import binary_auroc, binary_roc  # noqa: E402

from gazeguard.attacks import Attack, IADGazeRegressor, PoisonedDataModule, create, evaluate_attack  # noqa: E402
from gazeguard.data import GazeDataModule  # noqa: E402
from gazeguard.defenses import (  # noqa: E402
    REPAIR_DATA,
    RepairConfig,
    SecureGazeConfig,
    detect,
    load_clean_set,
    repair_flagged,
)
from gazeguard.fit import DATA_DEFAULTS  # noqa: E402
from gazeguard.model import GazeRegressor  # noqa: E402

PLANTED = 0.9  # ASR@5deg at which an attack counts as a working backdoor
FIELDS = (
    "attack", "seed", "asr", "backdoored", "statistic", "attack_success", "target",
    "detect_seconds", "benign_before", "benign_after", "asr_after", "robust_before", "robust_after",
    "repair_seconds", "repair_method", "clean_model_asr", "clean_model_ratio",
)


def load_model(row: dict[str, Any]) -> tuple[torch.nn.Module, Optional[Attack]]:
    """The zoo model of ``row`` and the attack it was trained with (``None`` for clean models).
    For IAD the attack's trigger is the generator co-trained with that model."""
    if row["attack"] == "iad":
        checkpoint = torch.load(row["checkpoint"], map_location="cpu", weights_only=True)
        attack = create("iad", **checkpoint["hyper_parameters"])
        module = IADGazeRegressor(GazeRegressor(), attack)  # shares attack.trigger's generator
        module.load_state_dict(checkpoint["state_dict"])
        return module.victim.eval(), attack
    model = GazeRegressor.load_from_checkpoint(row["checkpoint"], map_location="cpu").eval()
    return model, None if row["attack"] == "clean" else create(row["attack"])


def datamodule(seed: int) -> GazeDataModule:
    """The data the zoo model of ``seed`` was trained on (fit's defaults)."""
    options = {key.removeprefix("data."): value for key, value in DATA_DEFAULTS.items()}
    data = GazeDataModule(**{**options, "seed": seed})
    data.setup()
    return data


def judge(
    row: dict[str, Any], config: SecureGazeConfig, repair_config: Optional[RepairConfig], repair_data: str = "auto"
) -> dict[str, Any]:
    """Detect (and maybe repair) one zoo model; ``repair_data`` as in the SecureGaze callback
    (``auto``: the poisoned training split, or the clean split when it holds no all-to-one
    poisons, as for IAD)."""
    model, attack = load_model(row)
    data = datamodule(row["seed"])
    clean = load_clean_set(data.defender_dataloader())  # decoded once for detection and repair
    result = detect(model, clean, config)
    backdoored = row["attack"] != "clean" and row["asr"] >= PLANTED
    out = {
        "attack": row["attack"], "seed": row["seed"], "asr": row["asr"], "backdoored": backdoored,
        "statistic": result.statistic,
        "attack_success": result.attack_success, "target": " ".join(f"{v:.3f}" for v in result.target),
        "detect_seconds": result.seconds["total"],
        "benign_before": row["benign_error"], "robust_before": row["robust_error"],
    }
    if repair_config is not None and backdoored and attack is not None:
        poisoned = PoisonedDataModule(data, attack)
        repaired, details = repair_flagged(model, clean, result, poisoned.split_dataset("train"), repair_data,
                                           repair_config)
        after = evaluate_attack(repaired, poisoned)
        out.update(benign_after=after["benign_error"], asr_after=after["asr"], robust_after=after["robust_error"],
                   repair_seconds=details["seconds"], repair_method=repair_route(details))
    return out


def repair_route(details: dict[str, Any]) -> str:
    """The report's repair method, with the trigger estimate of the training-data repair."""
    kind = details.get("trigger_kind")
    return details["method"] if kind is None else f"{details['method']} ({kind})"


def clean_model_under(row: dict[str, Any], clean_row: dict[str, Any]) -> dict[str, float]:
    """The yardstick of a repair: how the never-poisoned model of the same seed fares on the
    triggered test split of ``row``'s attack (a trigger that hides the eyes, like tape, raises
    anyone's robust error; a noisy one pulls predictions towards the middle, where the target is)."""
    _, attack = load_model(row)
    model, _ = load_model(clean_row)
    metrics = evaluate_attack(model, PoisonedDataModule(datamodule(row["seed"]), attack))
    return {"clean_model_asr": metrics["asr"], "clean_model_ratio": metrics["robust_error"] / metrics["benign_error"]}


def calibrate(rows: list[dict[str, Any]]) -> Optional[float]:
    """The geometric middle of the lowest clean and the highest backdoored statistic (``None``
    until both kinds of model are there)."""
    clean = [float(r["statistic"]) for r in rows if r["attack"] == "clean"]
    backdoored = [float(r["statistic"]) for r in rows if r["backdoored"]]
    if not clean or not backdoored:
        return None
    return (min(clean) * max(backdoored)) ** 0.5


def rates(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy, TPR, FPR and AUROC over clean models and planted backdoors."""
    judged = [r for r in rows if r["attack"] == "clean" or r["backdoored"]]
    if not judged:
        return {}
    truth = torch.tensor([bool(r["backdoored"]) for r in judged])
    flagged = torch.tensor([bool(r["flagged"]) for r in judged])
    score = -torch.tensor([float(r["statistic"]) for r in judged])  # lower statistic = more backdoored
    out = {"models": len(judged), "accuracy": (truth == flagged).float().mean().item()}
    out["tpr"] = flagged[truth].float().mean().item() if truth.any() else float("nan")
    out["fpr"] = flagged[~truth].float().mean().item() if (~truth).any() else float("nan")
    both = truth.any() and (~truth).any()
    out["auroc"] = binary_auroc(score, truth.long()).item() if both else float("nan")
    return out


def picture(rows: list[dict[str, Any]], threshold: float, path: Path) -> None:
    """Histogram of the statistic per class with the threshold, and the ROC curve."""
    fig, (hist, roc) = plt.subplots(1, 2, figsize=(10, 4))
    groups = {
        "clean": [r for r in rows if r["attack"] == "clean"],
        "backdoored (ASR >= 90%)": [r for r in rows if r["backdoored"]],
        "attack did not plant": [r for r in rows if r["attack"] != "clean" and not r["backdoored"]],
    }
    values = [float(r["statistic"]) for r in rows]
    bins = torch.linspace(0.0, max(values + [threshold]) * 1.05, 25).tolist()
    for (label, group), colour in zip(groups.items(), ("tab:green", "tab:red", "tab:grey")):
        if group:
            hist.hist([float(r["statistic"]) for r in group], bins=bins, alpha=0.6, label=label, color=colour)
    hist.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}")
    hist.set_xlabel("dispersion ratio (lower = outputs collapse)")
    hist.set_ylabel("models")
    hist.legend(fontsize=8)
    judged = groups["clean"] + groups["backdoored (ASR >= 90%)"]
    if groups["clean"] and groups["backdoored (ASR >= 90%)"]:
        truth = torch.tensor([bool(r["backdoored"]) for r in judged]).long()
        fpr, tpr, _ = binary_roc(-torch.tensor([float(r["statistic"]) for r in judged]), truth)
        roc.plot(fpr.numpy(), tpr.numpy(), marker="o")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate")
    roc.set_title("ROC (clean vs planted backdoors)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value in (None, ""):
        return "-"
    return format(float(value), spec)


def _yardstick(row: dict[str, Any]) -> str:
    if row.get("clean_model_asr") in (None, ""):
        return "-"
    return f"{100 * float(row['clean_model_asr']):.1f}% / {float(row['clean_model_ratio']):.2f}"


def write_tables(
    rows: list[dict[str, Any]],
    calibration: set[int],
    tuning: set[int],
    threshold: Optional[float],
    stem: Path,
    command: str,
) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    calibrated = threshold is None
    if calibrated:
        threshold = calibrate([r for r in rows if r["seed"] in calibration])
    for row in rows:
        row["flagged"] = "" if threshold is None else float(row["statistic"]) < threshold
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS + ("flagged",))
        writer.writeheader()
        writer.writerows({key: row.get(key, "") for key in FIELDS + ("flagged",)} for row in rows)
    if threshold is None:  # nothing to decide with yet
        return
    picture(rows, threshold, stem.with_suffix(".png"))
    sets = {
        "calibration seeds " + ", ".join(map(str, sorted(calibration))): [r for r in rows if r["seed"] in calibration],
        "seeds looked at while tuning " + ", ".join(map(str, sorted(tuning))): [r for r in rows if r["seed"] in tuning],
        "fresh seeds": [r for r in rows if r["seed"] not in calibration | tuning],
        "all": rows,
    }
    lines = [
        "# SecureGaze detection on the attack zoo", "",
        f"Command: `python experiments/detection.py {command}`; threshold {threshold:.3f} "
        + ("(calibrated on the calibration seeds only). " if calibrated else "(given). ")
        + "A model is *backdoored* when its attack reached ASR@5deg >= 90 %; flagged when its statistic "
        "is below the threshold.", "",
        "| models | n | accuracy | TPR | FPR | AUROC |", "|---|---|---|---|---|---|",
    ]
    for name, group in sets.items():
        r = rates(group)
        if r:
            lines.append(f"| {name} | {r['models']} | {100 * r['accuracy']:.0f}% | {100 * r['tpr']:.0f}% | "
                         f"{100 * r['fpr']:.0f}% | {r['auroc']:.3f} |")
    seconds = [float(r["detect_seconds"]) for r in rows]
    lines += ["", f"Wall time per detection (2 CPU cores, shared with training): median {statistics.median(seconds):.0f} s, "
              f"range {min(seconds):.0f}-{max(seconds):.0f} s.", "", "![statistic and ROC](detection.png)", "",
              "| attack | seed | ASR | backdoored | statistic | flagged | inferred target (rad) | s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attack']} | {r['seed']} | {_fmt(r['asr'], '.3f') if r['attack'] != 'clean' else '-'} | "
                     f"{'yes' if r['backdoored'] else 'no'} | {_fmt(r['statistic'])} | "
                     f"{'yes' if r['flagged'] else 'no'} | {r['target']} | {_fmt(r['detect_seconds'], '.0f')} |")
    repaired = [r for r in rows if r.get("asr_after") not in (None, "")]
    if repaired:
        lines += ["", "## Repair of the backdoored models", "",
                  "Every backdoored model, flagged or not. Bars: ASR@5deg <= 5 %, robust error <= 1.5x benign "
                  "error, benign error rising by <= 0.5 deg.", "",
                  "The last column is the yardstick: the never-poisoned model of the same seed on the same "
                  "triggered test images (ASR / robust over benign error).", "",
                  "| attack | seed | benign before -> after | ASR before -> after | robust before -> after | "
                  "robust / benign | bars | repaired on | s | clean model |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in repaired:
            rise = float(r["benign_after"]) - float(r["benign_before"])
            ratio = float(r["robust_after"]) / float(r["benign_after"])
            ok = float(r["asr_after"]) <= 0.05 and ratio <= 1.5 and rise <= 0.5
            lines.append(
                f"| {r['attack']} | {r['seed']} | {_fmt(r['benign_before'], '.2f')} -> {_fmt(r['benign_after'], '.2f')} "
                f"({rise:+.2f}) | {100 * float(r['asr']):.1f}% -> {100 * float(r['asr_after']):.1f}% | "
                f"{_fmt(r['robust_before'], '.2f')} -> {_fmt(r['robust_after'], '.2f')} | {ratio:.2f} | "
                f"{'yes' if ok else 'NO'} | {r.get('repair_method') or 'clean'} | {_fmt(r['repair_seconds'], '.0f')} | "
                f"{_yardstick(r)} |"
            )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def read_done(csv_path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Rows judged by an earlier run (kept unless ``--redo``)."""
    if not csv_path.exists():
        return {}
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["seed"] = int(row["seed"])
        row["backdoored"] = row["backdoored"] == "True"
        row["asr"] = float(row["asr"])
    return {(row["attack"], row["seed"]): row for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=RESULTS / "attacks.csv", help="attack benchmark table")
    parser.add_argument("--results", type=Path, default=RESULTS / "detection", help="table stem (.csv/.md/.png)")
    parser.add_argument("--calibration-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--tuning-seeds", type=int, nargs="*", default=[],
                        help="seeds whose models were looked at while choosing hyper-parameters (reported apart)")
    parser.add_argument("--threshold", type=float, help="fixed threshold (default: calibrated, see above)")
    parser.add_argument("--attacks", nargs="*", help="only these zoo entries (default: all, clean included)")
    parser.add_argument("--seeds", type=int, nargs="*", help="only these seeds (default: all)")
    parser.add_argument("--repair", action="store_true", help="also repair the backdoored models")
    parser.add_argument("--repair-data", choices=REPAIR_DATA, default="auto",
                        help="repair on the poisoned training split (auto falls back to the defender's clean split)")
    parser.add_argument("--redo", action="store_true", help="judge models judged by an earlier run again")
    args = parser.parse_args()
    done = {} if args.redo else read_done(args.results.with_suffix(".csv"))
    zoo = [
        r for r in load_rows(args.zoo)
        if (not args.attacks or r["attack"] in args.attacks) and (not args.seeds or r["seed"] in args.seeds)
    ]
    command = " ".join(sys.argv[1:])
    calibration, tuning = set(args.calibration_seeds), set(args.tuning_seeds) - set(args.calibration_seeds)
    for row in zoo:
        key = (row["attack"], row["seed"])
        if key in done and (not args.repair or not done[key]["backdoored"] or done[key].get("asr_after")):
            continue
        start = time.perf_counter()
        done[key] = judge(row, SecureGazeConfig(), RepairConfig() if args.repair else None, args.repair_data)
        print(f"{key}: statistic {done[key]['statistic']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        write_tables(ordered(done), calibration, tuning, args.threshold, args.results, command)
    clean_models = {r["seed"]: r for r in load_rows(args.zoo) if r["attack"] == "clean"}
    for row in zoo:  # the yardstick of every repair, also of repairs judged by an earlier run
        judged = done.get((row["attack"], row["seed"]))
        repaired = judged and judged.get("asr_after") not in (None, "")
        if repaired and not judged.get("clean_model_asr") and row["seed"] in clean_models:
            judged.update(clean_model_under(row, clean_models[row["seed"]]))
    write_tables(ordered(done), calibration, tuning, args.threshold, args.results, command)


def ordered(done: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(done.values(), key=lambda r: (r["attack"] != "clean", r["attack"], r["seed"]))


if __name__ == "__main__":
    main()
