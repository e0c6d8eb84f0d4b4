"""Every third-party module the project imports is pinned in requirements*.txt, and every pin is imported.

An unpinned import works on the machine where it happens to be installed (braceexpand came in only as
webdataset's dependency) and breaks a fresh `make venv`; an unused pin costs every install for nothing."""
import ast
import os
import re
import sys

from tests.conftest import REPO

# Top-level module -> distribution, where the two names differ beyond case and -/_.
DISTRIBUTION = {"PIL": "pillow", "open_clip": "open_clip_torch", "yaml": "pyyaml", "cleanfid": "clean-fid",
                "sklearn": "scikit-learn", "cv2": "opencv-python"}
# Imported but not pinned, on purpose.
UNPINNED = {
    "hfai": "High-Flyer's cluster package: installed only on that platform, imported only where it is found "
            "(engine/launch.py)",
}
# Pinned but never imported by name, on purpose.
INDIRECT = {
    "tensorboard": "torch.utils.tensorboard imports it (engine/logs.py)",
    "pytest-timeout": "a pytest plugin: pytest.ini's `timeout` needs it",
    "pytest-xdist": "a pytest plugin: `make test` runs the suite in TEST_WORKERS processes with it (-n)",
}
SKIP_DIRS = {"runs", "__pycache__"}  # runs/: training output (.gitignore); hidden folders (.venv, .git) too


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        yield from (os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))


def imported_modules() -> dict[str, str]:
    """Top-level name of every absolute import (module level or inside a function) -> one file importing it."""
    found = {}
    for path in project_files():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], os.path.relpath(path, REPO))
    return found


def pinned(filename: str) -> dict[str, str]:
    """{normalised distribution: requirement line} of a requirements file and those it includes (-r)."""
    out = {}
    for line in (REPO / filename).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            out.update(pinned(line[2:].strip()))
        elif line:
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*[^\s;]+(\s*;.*)?", line)
            assert m, f"{filename}: {line!r} is not pinned to one version (name==version)"
            out[normalise(m.group(1))] = line
    return out


def local_modules() -> set[str]:
    return {p.stem if p.suffix == ".py" else p.name for p in REPO.iterdir()
            if not p.name.startswith(".") and (p.suffix == ".py" or p.is_dir())}


def test_every_import_is_pinned_and_every_pin_imported():
    pins = pinned("requirements-dev.txt")  # includes requirements.txt
    local = local_modules()
    third_party = {m: f for m, f in imported_modules().items()
                   if m not in sys.stdlib_module_names and m not in local and m != "__future__"}
    assert {"torch", "braceexpand", "PIL"} <= set(third_party)  # the scan sees what the project imports
    unpinned = {m: f for m, f in third_party.items()
                if normalise(DISTRIBUTION.get(m, m)) not in pins and m not in UNPINNED}
    assert not unpinned, f"imported but not pinned in requirements*.txt: {unpinned}"
    used = {normalise(DISTRIBUTION.get(m, m)) for m in third_party}
    unused = sorted(pins[d] for d in pins if d not in used and d not in {normalise(k) for k in INDIRECT})
    assert not unused, f"pinned but imported nowhere: {unused}"
