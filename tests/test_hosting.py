"""A hosted app has the store file alone: every page renders with torch, the model libraries and the
pipeline made impossible to import, and requirements.txt does not pull them in."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "app" / "Home.py", *sorted((ROOT / "app" / "pages").glob("*.py"))]
BLOCKED = ("torch", "transformers", "transformer_lens", "trl", "accelerate", "pipeline")
MODEL_PACKAGES = {"torch", "transformers", "transformer-lens", "trl", "accelerate", "datasets"}

# Runs at interpreter start in the app's process: any import of a blocked package fails and is logged.
# Runs at interpreter start in the app's process: loading a blocked package fails and is logged. Finding
# one still succeeds, since libraries such as polars probe with find_spec and import only on first use.
SITECUSTOMIZE = f"""
import importlib.abc, importlib.util, os, sys

class _Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        with open(os.environ["BLOCKED_LOG"], "a") as f:
            f.write(spec.name + "\\n")
        raise ImportError(f"{{spec.name}} may not be imported by the hosted app")

    def exec_module(self, module):
        raise ImportError(module.__name__)

class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return importlib.util.spec_from_loader(name, _Refuse())
        return None

sys.meta_path.insert(0, _Blocker())
"""

RENDER = """
import json, sys
from streamlit.testing.v1 import AppTest
try:
    import torch
    sys.exit("the blocker let torch in")
except ImportError:
    pass
out = {}
for page in sys.argv[1:]:
    at = AppTest.from_file(page, default_timeout=120).run()
    out[page] = {"exception": [e.value for e in at.exception], "error": [e.value for e in at.error],
                 "elements": len(at.main.children)}
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED_NAMES)
print(json.dumps(out))
"""


def render_pages(python: str, store_path: Path, tmp: Path) -> tuple[dict, list[str]]:
    """Render every page with `python` in a fresh process; returns (per-page results, blocked loads tried)."""
    (tmp / "site").mkdir(exist_ok=True)
    (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp / "blocked.log"
    log.write_text("")
    env = os.environ | {"STORE": str(store_path), "PYTHONPATH": str(tmp / "site"), "BLOCKED_LOG": str(log)}
    res = subprocess.run([python, "-c", RENDER.replace("BLOCKED_NAMES", repr(BLOCKED)), *map(str, PAGES)], cwd=ROOT / "app", env=env,
                         capture_output=True, text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), log.read_text().splitlines()


def test_every_page_renders_with_torch_and_pipeline_unimportable(tiny_run, tmp_path):
    cfg, _ = tiny_run
    result, tried = render_pages(sys.executable, Path(cfg.run.store), tmp_path)
    modules = result.pop("modules")
    assert tried == ["torch"] and modules == []  # the script's own check that the blocker works, nothing else
    assert set(result) == {str(p) for p in PAGES}
    for page, r in result.items():
        assert r["exception"] == [] and r["error"] == [], page
        assert r["elements"] >= 2, page


def _closure(names: list[str]) -> set[str]:
    """Installed distributions that `names` require, transitively (extras not requested are skipped)."""
    seen, todo = set(), [n.lower() for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for spec in importlib.metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name.lower().replace("_", "-"))
    return seen


def test_requirements_txt_does_not_pull_model_libraries():
    reqs = [Requirement(line).name for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-"))]
    assert {"streamlit", "duckdb"} <= set(reqs)
    closure = _closure(reqs)
    assert len(closure) > len(reqs)  # the walk follows dependencies
    assert not closure & MODEL_PACKAGES


@pytest.mark.parametrize("module", ["app/queries.py", "app/charts.py", "app/common.py", "store/__init__.py"])
def test_app_modules_import_nothing_from_the_pipeline(module):
    text = (ROOT / module).read_text()
    for name in BLOCKED:
        assert f"import {name}" not in text and f"from {name}" not in text, f"{module} imports {name}"
