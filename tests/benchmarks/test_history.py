"""benchmarks/history.py: one row per commit that changed the shipped checkpoint, read from git."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def history(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("history", ROOT / "benchmarks" / "history.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never the enclosing repository's
    return module


def report(best: float, fast: float, auto: float, auto_mflops: float, met: list[bool]) -> dict:
    results = {f"subnet_{i}": {"psnr": best - i, "mflops_per_pixel": 1.0} for i in range(3)}
    results |= {"best": {"psnr": best, "mflops_per_pixel": 0.4}, "fast": {"psnr": fast, "mflops_per_pixel": 0.1},
                "auto": {"psnr": auto, "mflops_per_pixel": auto_mflops}}
    targets = {f"target {i}": {"value": 0.0, "bar": 0.0, "met": m} for i, m in enumerate(met)}
    return {"results": {"25": results}, "peers": {"25": {"FFDNet": {"psnr": 31.46}, "CBM3D": {"psnr": 31.13}}},
            "targets_sigma_25": targets}


def commit(repo: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", message], check=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_one_row_per_checkpoint_commit_from_its_own_quality_report(history, tmp_path, capsys):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    commit(tmp_path, {history.CHECKPOINT: "weights 1"}, "first checkpoint, no report yet")
    commit(tmp_path, {history.CHECKPOINT: "weights 2",
                      history.QUALITY: json.dumps(report(31.20, 30.90, 31.18, 0.3, [False, True]))}, "second")
    commit(tmp_path, {"README.md": "unrelated"}, "does not touch the checkpoint")
    commit(tmp_path, {history.CHECKPOINT: "weights 3",
                      history.QUALITY: json.dumps(report(31.41, 31.05, 31.37, 0.26, [False, True, True]))}, "third")

    assert history.main() == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FFDNet 31.46 dB and CBM3D 31.13 dB")
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == 3  # the README-only commit is not a row
    header_cells = lines[2].count("|")
    assert all(row.count("|") == header_cells for row in rows)
    assert "no benchmarks/results/quality.json in this commit" in rows[0]
    cells = [cell.strip() for cell in rows[1].strip("|").split("|")]
    assert cells[3:] == ["3", "31.20", "30.90", "31.18", "75.0%", "1 of 2"]
    cells = [cell.strip() for cell in rows[2].strip("|").split("|")]
    assert cells[3:] == ["3", "31.41", "31.05", "31.37", "65.0%", "2 of 3"]


def test_outside_a_git_repository_it_says_so_and_fails(history, tmp_path, capsys):
    assert history.main() == 1
    assert "cannot read the git history" in capsys.readouterr().err
