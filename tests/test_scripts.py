"""scripts/*.sh (make shapes, make scenes): the shared set-up they source, and that bash can parse them.
The trainings themselves take most of an hour on 2 cores; README "Results" has their measured runs."""
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["shapes.sh", "scenes.sh", "flow.sh"])
def test_script_parses_and_sources_the_common_setup(script):
    path = REPO / "scripts" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert 'source "$(dirname "$0")/common.sh"' in path.read_text()


def test_common_setup_works_from_any_folder(tmp_path):
    """Sourced from elsewhere, it moves to the repository root, keeps a given PY, and stage prints minutes."""
    r = subprocess.run(["bash", "-c", f'export PY=mypy; source {REPO}/scripts/common.sh; pwd; echo "$PY"; stage "1/5 x"'],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(REPO), "mypy", "== [0 min] 1/5 x"]
    r = subprocess.run(["bash", "-c", f"source {REPO}/scripts/common.sh; false; echo reached"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "reached" not in r.stdout  # errexit is on


def test_flow_script_refuses_an_unknown_world(tmp_path):
    r = subprocess.run(["bash", str(REPO / "scripts" / "flow.sh")], env={"WORLD": "mars", "PATH": "/usr/bin:/bin"},
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: WORLD must be shapes or scenes, not mars"
