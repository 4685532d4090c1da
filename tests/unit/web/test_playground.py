"""The playground's page, script and style sheet ship in the package, so `pip install .` serves them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from serve_app.web import playground

ROOT = Path(__file__).resolve().parents[3]
FILES = [playground.PAGE, *playground.ASSETS]


def test_the_page_names_only_files_the_app_serves():
    page = (playground.STATIC / playground.PAGE).read_text()
    linked = [path for path in re.findall(r'(?:src|href)="([^"]+)"', page) if not path.startswith("data:")]
    assert sorted(linked) == sorted(f"static/{name}" for name in playground.ASSETS)


@pytest.mark.slow  # a subprocess of its own
def test_a_wheel_holds_the_playground_files(tmp_path):
    pytest.importorskip("setuptools", reason="building a wheel without isolation needs setuptools")
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT / "serve_app", source / "serve_app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("flux_serve-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert [f"serve_app/web/static/{name}" in names for name in FILES] == [True] * len(FILES)
