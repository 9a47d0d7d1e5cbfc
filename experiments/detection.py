"""Benchmark: SecureGaze detection over model zoos, several detection seeds per model.

Every checkpoint of one or more zoo tables (written by ``experiments/attacks.py``: clean models
and every attack, several training seeds) is judged by :func:`gazeguard.defenses.detect` on the
defender's clean split of its own data (the split ``fit --defense securegaze`` uses), once per
detection seed (``--detection-seeds``; a seed covers the whole detection). A model counts as
*backdoored* when its attack reached ASR@5deg >= 90 %; attacks at 50-90 % are listed but not
scored, and below 50 % the attack did not plant.

The threshold is the calibration file's (``--calibration``, default: the shipped calibration of
the synthetic CPU default, made with ``python -m gazeguard.calibrate`` on clean models that no zoo
here holds), so nothing scored here chose it. Each zoo is a row of its own (``--zoo LABEL=CSV``):
models looked at while the detector's defaults were chosen apart from the *fresh* ones trained
after every choice was made.

The tables: per model, the statistic's min / median / max over the detection seeds, how many
draws were flagged and the worst draw's margin to the threshold; per zoo, accuracy, TPR, FPR and
AUROC over all (model, detection seed) draws, and the margins (lowest clean draw over the
threshold, threshold over the highest backdoored draw: both > 1 when every draw is right).

    python experiments/detection.py --zoo fresh=runs/zoo2.csv --detection-seeds 0 1 2

``--options`` changes detection options (JSON, e.g. ``'{"generator_shift": 4}'``) for a lab run
into its own ``--results``: the calibration's threshold then belongs to another setting, so such
a table compares statistics between settings, it does not score one.

Runs accumulate: draws already in the results CSV are kept (``--redo`` judges them again). A
checkpoint listed by several zoo tables is judged once, in the first zoo that lists it.
"""

from __future__ import annotations

import argparse
import csv
import json
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

from gazeguard.attacks import Attack, IADGazeRegressor, create  # noqa: E402
from gazeguard.data import GazeDataModule  # noqa: E402
from gazeguard.defenses import SecureGazeConfig, detect, load_clean_set  # noqa: E402
from gazeguard.defenses.calibration import Calibration  # noqa: E402
from gazeguard.defenses.securegaze.detection import DEFAULT_CALIBRATION  # noqa: E402
from gazeguard.fit import DATA_DEFAULTS  # noqa: E402
from gazeguard.gaze import gaze_distance  # noqa: E402
from gazeguard.model import GazeRegressor  # noqa: E402

PLANTED, REPORTED = 0.9, 0.5  # ASR@5deg: a working backdoor; reported but not scored between the two
FIELDS = ("zoo", "attack", "placement", "attack_target", "seed", "asr", "detection_seed", "statistic", "median_ratio",
          "attack_success", "target", "target_error", "seconds")
#: The inferred target must land this close to the attacker's (degrees) for a flagged backdoor to count as found.
TARGET_BAR = 5.0


def load_model(row: dict[str, Any]) -> tuple[torch.nn.Module, Optional[Attack]]:
    """The zoo model of ``row`` and the attack it was trained with (for IAD: the victim inside
    the co-trained module, and its co-trained trigger; ``None`` for a clean model)."""
    if row["attack"] == "iad":
        checkpoint = torch.load(row["checkpoint"], map_location="cpu", weights_only=True)
        attack = create("iad", **checkpoint["hyper_parameters"])
        module = IADGazeRegressor(GazeRegressor(), attack)
        module.load_state_dict(checkpoint["state_dict"])  # the trigger's generator is the module's
        return module.victim.eval(), attack
    model = GazeRegressor.load_from_checkpoint(row["checkpoint"], map_location="cpu").eval()
    return model, create(row["attack"], target=row["target"]) if row["attack"] != "clean" else None


def defender_split(seed: int) -> Any:
    """The defender's clean split of the data the zoo model of ``seed`` was trained on (fit's defaults)."""
    options = {key.removeprefix("data."): value for key, value in DATA_DEFAULTS.items()}
    data = GazeDataModule(**{**options, "seed": seed})
    data.setup()
    return load_clean_set(data.defender_dataloader())


def status(row: dict[str, Any]) -> str:
    """``clean``, ``backdoored`` (scored), ``partial`` (50-90 % ASR, listed only) or ``not planted``."""
    if row["attack"] == "clean":
        return "clean"
    asr = float(row["asr"])
    return "backdoored" if asr >= PLANTED else "partial" if asr >= REPORTED else "not planted"


def rates(draws: list[dict[str, Any]], threshold: float) -> dict[str, float]:
    """Accuracy, TPR, FPR, AUROC and both margins over the scored (model, detection seed) draws."""
    judged = [d for d in draws if status(d) in ("clean", "backdoored")]
    if not judged:
        return {}
    truth = torch.tensor([status(d) == "backdoored" for d in judged])
    stats = torch.tensor([float(d["statistic"]) for d in judged])
    flagged = stats < threshold
    out = {"models": len({model_key(d) for d in judged}), "draws": len(judged),
           "accuracy": (truth == flagged).float().mean().item()}
    out["tpr"] = flagged[truth].float().mean().item() if truth.any() else float("nan")
    near = torch.tensor([d["target_error"] != "" and float(d["target_error"]) <= TARGET_BAR for d in judged])
    out["found"] = (flagged & near)[truth].float().mean().item() if truth.any() else float("nan")
    out["fpr"] = flagged[~truth].float().mean().item() if (~truth).any() else float("nan")
    both = bool(truth.any() and (~truth).any())
    out["auroc"] = binary_auroc(-stats, truth.long()).item() if both else float("nan")
    out["clean_margin"] = stats[~truth].min().item() / threshold if (~truth).any() else float("nan")
    out["backdoor_margin"] = threshold / stats[truth].max().item() if truth.any() else float("nan")
    return out


def per_model(draws: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """One line per model: the spread of its draws, the flagged count, its worst draw's margin."""
    models: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for d in draws:
        models.setdefault(model_key(d), []).append(d)
    out = []
    for (zoo, attack, placement, seed), group in models.items():
        stats = sorted(float(d["statistic"]) for d in group)
        kind = status(group[0])
        margin = stats[0] / threshold if kind == "clean" else threshold / stats[-1]
        # how far the flagged draws' inferred targets landed from the attacker's
        errors = [float(d["target_error"]) for d in group if float(d["statistic"]) < threshold and d["target_error"] != ""]
        out.append({"zoo": zoo, "attack": attack, "placement": placement, "seed": seed, "asr": group[0]["asr"],
                    "attack_target": group[0]["attack_target"], "status": kind,
                    "spread": (stats[0], statistics.median(stats), stats[-1]), "n": len(stats),
                    "flagged": sum(s < threshold for s in stats), "margin": margin,
                    "target_errors": errors, "targets": "; ".join(d["target"] for d in group)})
    return out


def model_key(d: dict[str, Any]) -> tuple[str, str, str, int]:
    """A zoo model's identity: zoo, attack, target placement, training seed."""
    return (d["zoo"], d["attack"], d.get("placement") or "centre", d["seed"])


def target_error(inferred: list[float], attacker: str) -> str:
    """Degrees between the inferred and the attacker's target (``""`` for clean models)."""
    if attacker in ("", "-"):
        return ""
    truth = torch.tensor([float(v) for v in attacker.split()])
    return f"{float(gaze_distance(torch.tensor(inferred)[None], truth[None], 'angle')):.2f}"


def picture(draws: list[dict[str, Any]], threshold: float, path: Path) -> None:
    """Histogram of every draw's statistic per class with the threshold, and the ROC over draws."""
    fig, (hist, roc) = plt.subplots(1, 2, figsize=(10, 4))
    groups = {"clean": "tab:green", "backdoored": "tab:red", "partial": "tab:orange", "not planted": "tab:grey"}
    values = [float(d["statistic"]) for d in draws]
    bins = torch.linspace(0.0, max(values + [threshold]) * 1.05, 30).tolist()
    for kind, colour in groups.items():
        group = [float(d["statistic"]) for d in draws if status(d) == kind]
        if group:
            hist.hist(group, bins=bins, alpha=0.6, label=kind, color=colour)
    hist.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}")
    hist.set_xlabel("dispersion ratio (lower = outputs collapse)")
    hist.set_ylabel("(model, detection seed) draws")
    hist.legend(fontsize=8)
    judged = [d for d in draws if status(d) in ("clean", "backdoored")]
    truth = torch.tensor([status(d) == "backdoored" for d in judged]).long()
    if judged and 0 < int(truth.sum()) < len(judged):
        fpr, tpr, _ = binary_roc(-torch.tensor([float(d["statistic"]) for d in judged]), truth)
        roc.plot(fpr.numpy(), tpr.numpy(), marker="o")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate")
    roc.set_title("ROC over draws (clean vs backdoored)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(value: float) -> str:
    return "-" if value != value else f"{100 * value:.0f}%"


def _auroc(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"


def _ratio(value: float) -> str:
    return "-" if value != value else f"{value:.2f}x"


def write_tables(draws: list[dict[str, Any]], calibration: Calibration, source: str, stem: Path, command: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({key: d.get(key, "") for key in FIELDS} for d in draws)
    threshold = calibration.threshold
    picture(draws, threshold, stem.with_suffix(".png"))
    summary = calibration.summary()
    low, mid, high = summary["clean_range"]
    lines = [
        "# SecureGaze detection on the model zoos", "",
        f"Command: `python experiments/detection.py {command}`.", "",
        f"Threshold {threshold:.3f} from the calibration `{source}`: {summary['models']} clean reference models "
        f"x {summary['draws'] // summary['models']} detection seeds (none of them in a zoo below), clean statistic "
        f"{low:.3f} / {mid:.3f} / {high:.3f} (min / median / max), false-positive rate {calibration.fpr:g} per draw "
        f"({calibration.method}). A model is *backdoored* when its attack reached ASR@5deg >= 90 % (scored), "
        "*partial* at 50-90 % (listed, not scored); a draw is flagged when its statistic is below the threshold. "
        "Margins: lowest clean draw / threshold and threshold / highest backdoored draw (> 1: every draw right).", "",
        f"| zoo | models | draws | accuracy | TPR | found (target within {TARGET_BAR:g} deg) | FPR | AUROC | clean margin | "
        "backdoor margin |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    zoos = list(dict.fromkeys(d["zoo"] for d in draws))
    for name, group in [(z, [d for d in draws if d["zoo"] == z]) for z in zoos] + [("all", draws)]:
        r = rates(group, threshold)
        if r:
            lines.append(f"| {name} | {r['models']} | {r['draws']} | {_pct(r['accuracy'])} | {_pct(r['tpr'])} | {_pct(r['found'])} | "
                         f"{_pct(r['fpr'])} | {_auroc(r['auroc'])} | {_ratio(r['clean_margin'])} | "
                         f"{_ratio(r['backdoor_margin'])} |")
    seconds = [float(d["seconds"]) for d in draws]
    lines += ["", f"Wall time per detection (2 CPU cores, shared with other runs): median "
              f"{statistics.median(seconds):.0f} s, range {min(seconds):.0f}-{max(seconds):.0f} s.", "",
              f"![statistic and ROC]({stem.with_suffix('.png').name})", "",
              f"Target distance: degrees from the attacker's target to the inferred one, over the flagged draws "
              f"(worst); a backdoor counts as found when it is within {TARGET_BAR:g} deg.", "",
              "| zoo | attack | target (rad) | seed | ASR | status | statistic min / median / max | flagged | "
              "worst margin | target distance (deg) | inferred targets (rad) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in per_model(draws, threshold):
        asr = "-" if m["attack"] == "clean" else f"{100 * float(m['asr']):.1f}%"
        low, mid, high = m["spread"]
        aimed = "-" if m["attack"] == "clean" else f"{m['placement']} ({m['attack_target']})"
        distance = f"{max(m['target_errors']):.1f}" if m["target_errors"] else "-"
        lines.append(f"| {m['zoo']} | {m['attack']} | {aimed} | {m['seed']} | {asr} | {m['status']} | "
                     f"{low:.3f} / {mid:.3f} / {high:.3f} | {m['flagged']}/{m['n']} | {_ratio(m['margin'])} | "
                     f"{distance} | {m['targets']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def read_done(csv_path: Path) -> dict[tuple[str, str, str, int, int], dict[str, Any]]:
    """Draws of an earlier run (kept unless ``--redo``)."""
    if not csv_path.exists():
        return {}
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["seed"], row["detection_seed"] = int(row["seed"]), int(row["detection_seed"])
        if not row.get("placement"):  # a table from before targets were varied: every attack aimed at (0, 0)
            row["placement"], row["attack_target"] = ("-", "-") if row["attack"] == "clean" else ("centre", "0 0")
            row["target_error"] = target_error([float(v) for v in row["target"].split()], row["attack_target"])
    return {(*model_key(r), r["detection_seed"]): r for r in rows}


def first_zoo_only(zoos: list[tuple[str, list[dict[str, Any]]]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each checkpoint in the first zoo that lists it: a model in two tables is one model, scored once."""
    seen: set[str] = set()
    out = []
    for label, rows in zoos:
        out.append((label, [row for row in rows if row["checkpoint"] not in seen]))
        seen.update(row["checkpoint"] for row in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", nargs="+", default=[f"fresh={RESULTS / 'attacks.csv'}"],
                        help="LABEL=CSV zoo tables of experiments/attacks.py, one table row each")
    parser.add_argument("--detection-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION, help="where the threshold comes from")
    parser.add_argument("--results", type=Path, default=RESULTS / "detection", help="table stem (.csv/.md/.png)")
    parser.add_argument("--attacks", nargs="*", help="only these zoo entries (default: all, clean included)")
    parser.add_argument("--redo", action="store_true", help="judge draws judged by an earlier run again")
    parser.add_argument("--options", type=json.loads, default={},
                        help="detection options other than seed and threshold, as JSON (lab runs only)")
    args = parser.parse_args()
    calibration = Calibration.load(args.calibration, "securegaze")
    done = {} if args.redo else read_done(args.results.with_suffix(".csv"))
    source = args.calibration.resolve().relative_to(Path.cwd().resolve()) \
        if args.calibration.resolve().is_relative_to(Path.cwd().resolve()) else args.calibration
    command = " ".join(sys.argv[1:])
    zoos = first_zoo_only([(label, load_rows(Path(table)))
                           for label, table in (entry.split("=", 1) for entry in args.zoo)])
    # breadth first: every model's first seed before any model's second, so a cut-short run is still a zoo
    for detection_seed in args.detection_seeds:
        for label, rows in zoos:
            for row in rows:
                key = (*model_key({**row, "zoo": label, "placement": row["target"]}), detection_seed)
                if key in done or (args.attacks and row["attack"] not in args.attacks):
                    continue
                start = time.perf_counter()
                result = detect(load_model(row)[0], defender_split(row["seed"]),
                                SecureGazeConfig(**args.options, seed=detection_seed, threshold=calibration.threshold))
                done[key] = {"zoo": label, "attack": row["attack"], "placement": row["target"],
                             "attack_target": row["target_gaze"], "seed": row["seed"], "asr": row["asr"],
                             "detection_seed": detection_seed, "statistic": result.statistic,
                             "median_ratio": result.median_ratio,
                             "attack_success": result.attack_success,
                             "target": " ".join(f"{v:.3f}" for v in result.target),
                             "target_error": target_error(result.target, row["target_gaze"]),
                             "seconds": time.perf_counter() - start}
                print(f"{key}: statistic {result.statistic:.3f} ({done[key]['seconds']:.0f} s)", flush=True)
                write_tables(sorted(done.values(), key=order), calibration, str(source), args.results, command)
    if done:  # also when every draw was judged before: the tables of this calibration
        write_tables(sorted(done.values(), key=order), calibration, str(source), args.results, command)


def order(d: dict[str, Any]) -> tuple:
    return (d["zoo"], d["attack"] != "clean", d["attack"], d["seed"], d["placement"], d["detection_seed"])


if __name__ == "__main__":
    main()
