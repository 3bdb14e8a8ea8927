"""The install recipes agree: pyproject ranges, the pinned set, the conda env and the bentofile;
and what `bentoml build` writes is the container the README promises (CUDA base, one GPU, env)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
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


# What `bentoml build` writes, without Docker: the Bento under $BENTOML_HOME/bentos/<name>/<version>/:
# bento.yaml (services with their resources, envs, image: base image, Python, commands),
# env/docker/Dockerfile (what `bentoml containerize` builds), env/docker/entrypoint.sh and the
# setup script, env/python/requirements.txt (what the image installs), src/ (the included code).

CUDA_BASE_IMAGE = "nvidia/cuda:13.0.3-runtime-ubuntu24.04"


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`bentoml build` of this checkout into a BENTOML_HOME of the test's own (about 10 s)."""
    home = tmp_path_factory.mktemp("bentoml-home")
    bentoml = Path(sys.executable).parent / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([str(bentoml), "build"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = [p for p in (home / "bentos" / "llava_video_service").iterdir() if p.name != "latest"]
    return built


@pytest.fixture(scope="module")
def bento_yaml(bento: Path) -> dict:
    return yaml.safe_load((bento / "bento.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile(bento: Path) -> str:
    return (bento / "env" / "docker" / "Dockerfile").read_text()


def test_bento_installs_exactly_the_pinned_set(bento: Path):
    """requirements.txt as is (no re-lock to another torch), plus the bentoml pin BentoML appends."""
    lines = [line for line in (bento / "env" / "python" / "requirements.txt").read_text().splitlines() if line]
    assert not [line for line in lines if line.startswith("-")], "no index or option lines"
    assert pinned(bento / "env" / "python" / "requirements.txt") == pinned(REPO / "requirements.txt")


def test_image_is_built_on_the_cuda_of_the_pinned_torch(bento_yaml: dict, dockerfile: str):
    """A CUDA 13.0 runtime base: the CUDA of the torch wheels (nvidia-cuda-runtime 13.0.x)."""
    pins = pinned(REPO / "requirements.txt")
    torch_cuda = ".".join(pins["nvidia-cuda-runtime"].split(".")[:2])
    assert pins["cuda-toolkit"].startswith(f"{torch_cuda}.")
    image = bento_yaml["image"]
    assert image["base_image"] == CUDA_BASE_IMAGE
    assert re.fullmatch(rf"nvidia/cuda:{re.escape(torch_cuda)}\.\d+-runtime-ubuntu\d+\.\d+", image["base_image"])
    assert f"\nFROM {CUDA_BASE_IMAGE} AS base-container\n" in dockerfile
    assert image["python_version"] == "3.11"
    assert "uv venv --python 3.11 /app/.venv" in dockerfile


def test_image_installs_pip_before_bentoml_installs_uv_with_it(dockerfile: str):
    """The CUDA base has no Python: python3-pip is installed first, and PEP 668 lifted for it."""
    pip = dockerfile.index("apt-get install -q -y -o Dpkg::Options::=--force-confdef python3-pip")
    uv = dockerfile.index("pip install --no-cache-dir --require-hashes -r /tmp/uv-requirements.txt")
    env = dockerfile.index("ENV PIP_BREAK_SYSTEM_PACKAGES=$PIP_BREAK_SYSTEM_PACKAGES")
    assert env < pip < uv
    assert dockerfile.index("ENV DEBIAN_FRONTEND=$DEBIAN_FRONTEND") < pip


def test_service_declares_one_gpu_and_its_host_resources(bento_yaml: dict):
    (service,) = bento_yaml["services"]
    resources = service["config"]["resources"]
    assert resources["gpu"] == 1
    assert resources["memory"] == "16Gi" and resources["cpu"] == "6"


def test_image_environment(bento_yaml: dict, dockerfile: str):
    """The model, no CPU fallback, and the Hugging Face cache on the /models volume; no secret."""
    from settings import Settings

    envs = {env["name"]: env["value"] for env in bento_yaml["envs"]}
    assert envs["LLAVA_MODEL"] == Settings.model_fields["model"].default
    assert envs["LLAVA_DEVICE"] == "cuda"
    assert envs["HF_HOME"] == "/models/hf"
    assert envs["LLAVA_JOB_DIR"] == "/models/jobs"
    assert "LLAVA_API_KEY" not in envs
    for name, value in envs.items():
        assert f"ARG {name}={value}\nENV {name}=${name}\n" in dockerfile


def test_image_sources_are_the_service_packages_and_page_without_test_scaffolding(bento: Path):
    src = bento / "src"
    shipped = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    expected = {"service.py", "settings.py", "startup.py", "bentofile.yaml"} | {
        p.relative_to(REPO).as_posix()
        for package in ("http_api", "jobs", "llava_custom", "media")
        for p in REPO.glob(f"{package}/*.py")
    }
    expected |= {p.relative_to(REPO).as_posix() for p in REPO.glob("ui/*")}  # the web page's files
    assert shipped == expected
    assert not any(path.split("/")[0] in ("testing", "tests", "bench", "tools") for path in shipped)
    # Nothing the service imports is missing: it imports from the shipped sources alone.
    probe = "import sys; sys.path.remove(''); sys.path.insert(0, '.'); import service; print(service.__file__)"
    imported = subprocess.run(
        [sys.executable, "-c", probe], cwd=src, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": ""}
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert Path(imported.stdout.strip()).resolve() == (src / "service.py").resolve()
    for path in shipped - {"bentofile.yaml"}:
        scaffolding = re.search(r"^\s*(?:from|import)\s+(?:testing|tests|conftest)\b", (src / path).read_text(), re.M)
        assert not scaffolding, f"{path} imports test scaffolding, which the image does not ship"


def test_image_setup_script_makes_hf_home_the_service_users(bento_yaml: dict, bento: Path, tmp_path: Path):
    """The setup script runs after the packages, as root, and leaves HF_HOME to BentoML's user."""
    (command,) = bento_yaml["image"]["post_commands"]
    script = bento / re.fullmatch(r"chmod \+x (\S+) && \1", command).group(1)
    assert script.read_text() == (REPO / "deploy" / "image" / "setup.sh").read_text()
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    hf_home = tmp_path / "models" / "hf"
    env = {**os.environ, "HF_HOME": str(hf_home), "BENTO_USER": user}
    subprocess.run(["bash", str(script)], env=env, check=True)
    assert hf_home.is_dir() and hf_home.owner() == user and hf_home.parent.owner() == user
