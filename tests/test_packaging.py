"""The install recipes agree: pyproject ranges, the pinned set, the conda env and the bentofile."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def pinned(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-r")):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_pinned_set_satisfies_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = pinned(REPO / "requirements.txt") | pinned(REPO / "requirements-dev.txt")
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])


def test_conda_env_installs_the_pinned_set():
    env = yaml.safe_load((REPO / "llava_environ.yml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert "python=3.11" in env["dependencies"]
    assert sorted(pip_section) == sorted(f"{n}=={v}" for n, v in _raw_pins(REPO / "requirements.txt"))


def _raw_pins(path: Path) -> list[tuple[str, str]]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [tuple(line.split("==")) for line in lines if line and not line.startswith("#")]


def test_bentofile_uses_the_pinned_set_without_relocking():
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert bentofile["service"] == "service:LLaVAVideoService"
    assert bentofile["python"]["requirements_txt"] == "./requirements.txt"
    assert bentofile["python"]["lock_packages"] is False
    pins = pinned(REPO / "requirements.txt")
    assert pins["torch"] == "2.14.1" and pins["bentoml"].startswith("1.4.")
    for pattern in bentofile["include"]:
        assert list(REPO.glob(pattern)), f"bentofile includes {pattern}, which matches nothing"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / "README.md").read_text()
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")


def test_pinned_sets_are_closed():
    """Every requirement of every pinned package is pinned too, at a version it accepts: pip and
    uv (the container build) then install exactly these files, nothing newest-of-the-day (torch's
    setuptools was once left out by `pip freeze`). Read from the installed packages' metadata, so
    the environment must hold the pinned set, as `make test`'s does."""
    runtime = pinned(REPO / "requirements.txt")
    everything = runtime | pinned(REPO / "requirements-dev.txt")
    for pins, allowed in ((runtime, runtime), (everything, everything)):
        for name, version in pins.items():
            dist = metadata.distribution(name)
            assert dist.version == version, f"{name} {dist.version} is installed, {version} is pinned"
            for requirement in map(Requirement, dist.requires or []):
                if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                    continue
                needed = canonicalize_name(requirement.name)
                assert needed in allowed, f"{name} requires {requirement}, which is not pinned"
                assert requirement.specifier.contains(allowed[needed], prereleases=True), (name, str(requirement))


def test_bentoml_build_records_the_pinned_torch(tmp_path):
    """`bentoml build` packs the service with requirements.txt as is (no re-lock to another torch)."""
    bentoml = Path(sys.executable).parent / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([str(bentoml), "build"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (bento,) = [p for p in (tmp_path / "bentos" / "llava_video_service").iterdir() if p.name != "latest"]
    recorded = pinned(bento / "env" / "python" / "requirements.txt")
    assert (
        recorded["torch"] == "2.14.1" and recorded["transformers"] == pinned(REPO / "requirements.txt")["transformers"]
    )
    assert (bento / "src" / "service.py").is_file() and (bento / "src" / "llava_custom" / "modeling.py").is_file()
    assert not (bento / "src" / "tests").exists()
