"""The README's promises: its callback snippet runs, and the commands and files it names exist."""

from __future__ import annotations

import importlib.util
import itertools
import re
from pathlib import Path

from gazeguard.synthetic import SyntheticSpec

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- snippet: callback -->"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def callback_snippet() -> str:
    """The ```python block right after the snippet marker."""
    text = readme()
    assert MARKER in text, f"README.md lost the marker {MARKER!r} before the callback snippet"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.DOTALL)
    assert match, f"no ```python block right after {MARKER!r}"
    return match.group(1)


def shrink(code: str, tmp_path: Path) -> str:
    """The snippet on a tiny data set, 1 epoch and a few detection steps; fails if a pattern is gone."""
    data = (
        f"GazeDataModule(root={str(tmp_path / 'cache')!r}, "
        "synthetic=SyntheticSpec(num_subjects=4, samples_per_subject=24, image_size=32), image_size=32, "
        "test_subjects=('p03',), batch_size=16, defender_fraction=0.4)"
    )
    substitutions = {
        "GazeDataModule()": data,
        "SecureGazeConfig()": "SecureGazeConfig(steps=5, min_clean=8)",
        "RepairConfig()": "RepairConfig(epochs=1, min_clean=8)",
        "max_epochs=12": (
            f"max_epochs=1, accelerator='cpu', default_root_dir={str(tmp_path / 'runs')!r}, logger=False, "
            "enable_progress_bar=False, enable_model_summary=False"
        ),
    }
    for old, new in substitutions.items():
        assert code.count(old) == 1, f"the README's callback snippet no longer contains {old!r} exactly once"
        code = code.replace(old, new)
    return code


def test_callback_snippet_runs(tmp_path: Path, monkeypatch, capsys):
    code = shrink(callback_snippet(), tmp_path)
    monkeypatch.chdir(tmp_path)  # anything the snippet writes by default lands here
    namespace = {"__name__": "readme_snippet", "SyntheticSpec": SyntheticSpec}
    exec(compile(code, str(README) + ":callback-snippet", "exec"), namespace)  # noqa: S102 (our own README)
    defense = namespace["defense"]
    assert defense.verdict in ("clean", "backdoored")
    assert isinstance(defense.report["detection"]["score"], float)
    assert defense.report["verdict"] == defense.verdict
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(defense.verdict)
    assert len(list((tmp_path / "runs").rglob("securegaze_report.json"))) == 1


def test_every_module_the_readme_runs_exists():
    modules = set(re.findall(r"python -m (gazeguard(?:\.\w+)+)", readme()))
    assert {"gazeguard.fit", "gazeguard.prepare", "gazeguard.audit"} <= modules
    missing = [name for name in sorted(modules) if importlib.util.find_spec(name) is None]
    assert not missing, f"README.md runs modules that do not exist: {missing}"


def expand_braces(path: str) -> list[str]:
    """``a_{x,y}.yaml`` -> ``a_x.yaml``, ``a_y.yaml`` (any number of brace groups)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def test_every_experiments_path_in_the_readme_exists():
    text = readme()
    paths = set(re.findall(r"experiments/[\w./{},-]*[\w/}]", text))
    assert "experiments/securegaze_examples.png" in paths
    expanded = sorted({p for path in paths for p in expand_braces(path)})
    missing = [p for p in expanded if not (ROOT / p).exists()]
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_every_config_file_the_readme_names_by_itself_exists():
    """Bare names (`securegaze_hparams.yaml`, `attack_{badnets,...}.yaml`) are in configs/ or sweeps/."""
    names = re.findall(r"`([\w{},]+\.yaml)`", readme())
    expanded = sorted({n for name in names for n in expand_braces(name)})
    assert "attack_iad.yaml" in expanded and "securegaze_hparams.yaml" in expanded
    folders = [ROOT / "experiments" / "configs", ROOT / "experiments" / "sweeps"]
    missing = [n for n in expanded if not any((folder / n).is_file() for folder in folders)]
    assert not missing, f"README.md names config files found in neither experiments/configs nor sweeps: {missing}"


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(pages) >= 7  # README, CHANGELOG, the contract, SecureGaze, data and the attack families
    missing = []
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            target = link.split("#", 1)[0]
            if target and "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, f"links to nowhere: {missing}"


def test_docs_name_only_files_of_this_repository():
    """The docs stand alone: no path outside the repository, no private notes."""
    for page in [README, ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")]:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text and "SPEC" not in text and "/tmp/lab" not in text, page
