"""The container images, checked without a Docker engine (none here or in CI).

- hadolint passes on every Dockerfile (and fails on a bad one);
- the Dockerfiles follow the project's image rules (pinned bases, non-root UID of the manifests, ...);
- .dockerignore sends exactly what the Dockerfiles COPY;
- `make images` / `make push` build and push every role under the names bincounter/images.py gives;
- every image that pipeline.yaml and the rendered manifests reference is one `make images` builds;
- each image's Python requirements resolve the way its Dockerfile installs them (same uv, same
  command line, same constraints), and every resolved package is pinned in images/constraints.txt;
- each image's entrypoints import, and the modules they reach import only packages that image installs.
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

from bincounter import images

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HADOLINT = BIN / "hadolint"
UV = BIN / "uv"
CONSTRAINTS = ROOT / "images" / "constraints.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
CPU_ROLES = ("pipeline", "server")  # these install torch's CPU build; the trainer the CUDA build
# Only torch's CUDA build brings these; the CPU images do not have them.
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
# Images referenced by pipeline.yaml or the manifests that are not ours, each with its reason. None today.
THIRD_PARTY_IMAGES: dict[str, str] = {}
OUR_REF = re.compile(r"[\w.:-]+(?:/[\w.-]+)*/(?:%s)(?::[\w][\w.-]*|@sha256:[0-9a-f]{64})"
                     % "|".join(re.escape(repo) for repo, _ in images.IMAGES.values()))


def default_ref(role: str) -> str:
    """The reference the checked-in pipeline.yaml and manifests use, whatever BINCOUNTER_* says here."""
    return images.image(role, registry_=images.DEFAULT_REGISTRY, tag_=images.DEFAULT_TAG)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _clean_env() -> dict[str, str]:
    """The environment without BINCOUNTER_REGISTRY/TAG, the Makefile's variables, or a parent make's
    flags (`make test TAG=x` passes TAG=x down in MAKEFLAGS), so defaults apply as for the checked-in files."""
    drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "REGISTRY", "TAG", "DOCKER", "PLATFORM", "PYTHON"}
    return {k: v for k, v in os.environ.items() if not k.startswith("BINCOUNTER_") and k not in drop}


# ---------------------------------------------------------------- Dockerfile parsing

def instructions(dockerfile: Path, build_args: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comment lines dropped, and each ARG
    substituted as `docker build` does: its default, or the value in build_args (`--build-arg`).
    ARGs before the first FROM apply to FROM lines; an ARG in a stage applies after it in that stage."""
    out: list[tuple[str, str]] = []
    global_args: dict[str, str] = {}
    stage_args: dict[str, str] | None = None
    for word, rest in _raw_instructions(dockerfile):
        if word == "ARG":
            name, _, default = rest.partition("=")
            value = (build_args or {}).get(name, default.strip('"'))
            (global_args if stage_args is None else stage_args)[name] = value
        else:
            scope = global_args if word == "FROM" else (stage_args or {})
            rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m[1] or m[2], m[0]), rest)
            if word == "FROM":
                stage_args = {}
        out.append((word, rest))
    return out


def _raw_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    buf = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    ins = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def uv_installs(dockerfile: Path, build_args: dict[str, str] | None = None) -> list[list[str]]:
    """Each `uv pip install ...` of the Dockerfile's RUN instructions, as an argument list."""
    commands = []
    for word, rest in instructions(dockerfile, build_args):
        if word != "RUN":
            continue
        shell = re.sub(r"^(--mount=\S+\s+)+", "", rest)
        for part in re.split(r"&&|;", shell):
            argv = shlex.split(part)
            if argv[:3] == ["uv", "pip", "install"]:
                commands.append(argv)
    return commands


def dockerfile(role: str) -> Path:
    return ROOT / images.IMAGES[role][1]


# ---------------------------------------------------------------- hadolint and image rules

def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_every_role_has_a_dockerfile_and_no_stray_ones():
    found = {p.relative_to(ROOT).as_posix() for p in (ROOT / "images").glob("*/Dockerfile")}
    assert found == {path for _, path in images.IMAGES.values()}


def test_all_images_share_one_base():
    bases = {role: {rest.split()[0] for word, rest in instructions(dockerfile(role)) if word == "FROM"}
             - {"deps", "wheel"} for role in images.IMAGES}
    assert len(set(map(frozenset, bases.values()))) == 1, f"one Python base for all images (one patch to bump): {bases}"


@pytest.mark.parametrize("role", list(images.IMAGES))
def test_hadolint_passes(role):
    result = run_hadolint(dockerfile(role))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nENTRYPOINT bincounter\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):  # latest tag, unpinned pip, pip cache, shell-form
        assert rule in result.stdout, result.stdout


def test_every_ignored_hadolint_rule_is_explained():
    config = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())
    config_text = (ROOT / ".hadolint.yaml").read_text()
    for rule in config.get("ignored") or []:  # explained by a comment on its line in .hadolint.yaml
        line = next(ln for ln in config_text.splitlines() if rule in ln and not ln.lstrip().startswith("#"))
        assert "#" in line and len(line.split("#", 1)[1].strip()) > 10, f"{rule} is ignored without a reason"
    for role in images.IMAGES:
        for line in dockerfile(role).read_text().splitlines():
            if "hadolint ignore=" in line:
                reason = line.split("hadolint ignore=", 1)[1].partition(" ")[2]
                assert len(reason.strip()) > 10, f"{dockerfile(role)}: unexplained {line.strip()!r}"


@pytest.mark.parametrize("role", list(images.IMAGES))
def test_dockerfile_follows_the_image_rules(role):
    from bincounter.k8s import objects  # the manifests' pod security context and ports

    ins = instructions(dockerfile(role))
    bases = [rest.split()[0] for word, rest in ins if word == "FROM"]
    stage_names = {rest.split()[-1] for word, rest in ins if word == "FROM" and " AS " in rest.upper()}
    for base in bases:  # a pinned official Python base, the same patch release everywhere
        pinned_base = re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base)
        assert base in stage_names or pinned_base, f"{role}: unpinned or unexpected base {base}"
    assert len({b for b in bases if b not in stage_names}) == 1, f"{role}: stages use different bases {bases}"
    assert len(bases) >= 2, f"{role}: expected a multi-stage build"

    final = final_stage(dockerfile(role))
    final_text = "\n".join(f"{w} {r}" for w, r in final)
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] == str(objects.RUN_AS_UID), \
        f"{role}: the final USER must be the manifests' runAsUser {objects.RUN_AS_UID} (numeric, for runAsNonRoot)"
    entrypoints = [rest for word, rest in final if word == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1])[0].startswith("/"), f"{role}: exec-form ENTRYPOINT expected"
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make|clang)\b", final_text), f"{role}: compiler in final stage"
    for word, rest in final:  # no pip/uv cache left in a layer of the final image
        if word == "RUN" and re.search(r"\bpip install\b", rest):
            assert "--no-cache-dir" in rest, f"{role}: pip install without --no-cache-dir in the final stage"
        if word == "RUN" and "apt-get install" in rest:
            assert "rm -rf /var/lib/apt/lists/*" in rest
    if role == "server":
        assert ("EXPOSE", str(objects.SERVER_PORT)) in final
        cmd = json.loads(next(rest for word, rest in reversed(final) if word == "CMD"))
        assert cmd[cmd.index("--port") + 1] == str(objects.SERVER_PORT)
        assert cmd[cmd.index("--model") + 1] == "/mnt/models"  # where KServe's storage initializer puts it


def test_the_base_is_a_build_argument_with_the_pinned_default():
    for role in images.IMAGES:
        raw = _raw_instructions(dockerfile(role))
        first_from = next(i for i, (word, _) in enumerate(raw) if word == "FROM")
        assert ("ARG", "BASE_IMAGE=python:3.11.14-slim-bookworm") in raw[:first_from], role
        stages = {rest.split()[-1] for word, rest in raw if word == "FROM" and " AS " in rest}
        assert all(rest.split()[0] in ("${BASE_IMAGE}", *stages) for word, rest in raw if word == "FROM"), role
        local = instructions(dockerfile(role), {"BASE_IMAGE": "localhost/bincounter-base:bookworm"})
        assert {rest.split()[0] for word, rest in local if word == "FROM"} - stages == \
            {"localhost/bincounter-base:bookworm"}


def test_instruction_parser_substitutes_args(tmp_path):
    df = tmp_path / "Dockerfile"
    df.write_text('ARG B=x:1\nFROM ${B} AS s\nARG V=+cpu\nRUN echo "t==1${V}" $B\nFROM $B\nRUN echo ${V}\n')
    assert instructions(df) == [("ARG", "B=x:1"), ("FROM", "x:1 AS s"), ("ARG", "V=+cpu"),
                                ("RUN", 'echo "t==1+cpu" $B'), ("FROM", "x:1"), ("RUN", "echo ${V}")]
    assert instructions(df, {"V": ""})[3] == ("RUN", 'echo "t==1" $B')


# What images/buildah.sh passes where the CPU wheel index cannot be reached.
PYPI_TORCH_ARGS = {"TORCH_INDEX_URL": "https://pypi.org/simple", "TORCH_LOCAL_VERSION": ""}


@pytest.mark.parametrize("role", list(images.IMAGES))
def test_dockerfile_pins_agree_with_pyproject(role):
    text = "\n".join(rest for _, rest in instructions(dockerfile(role)))
    uv_version = re.search(r"uv==([\w.]+)", text).group(1)
    assert uv_version == importlib.metadata.version("uv"), "the Dockerfiles and the tests must use the same uv"
    pins = dict(re.findall(r'"(torch|torchvision)==([\w.]+)"', (ROOT / "pyproject.toml").read_text()))
    cpu_pins = dict(re.findall(r"\b(torch|torchvision)==([\w.]+)\+cpu\b", text))
    if role in CPU_ROLES:  # the local build's arguments give PyPI's build of the same versions
        torch_install = next(c for c in uv_installs(dockerfile(role), PYPI_TORCH_ARGS) if "--no-deps" in c)
        assert torch_install[torch_install.index("--index-url") + 1] == "https://pypi.org/simple"
        assert dict(a.split("==") for a in torch_install if "==" in a) == pins
        assert "TORCH_INDEX_URL" in (ROOT / "images" / "buildah.sh").read_text()
    if role in CPU_ROLES:
        assert CPU_TORCH_INDEX in text
        assert cpu_pins == pins, f"{role}: CPU torch pins {cpu_pins} differ from pyproject.toml {pins}"
    else:
        assert not cpu_pins and CPU_TORCH_INDEX not in text, "the trainer needs the CUDA build"


def test_image_tag_is_the_package_version():
    assert images.DEFAULT_TAG == PYPROJECT["project"]["version"], \
        "bump DEFAULT_TAG in bincounter/images.py together with the version in pyproject.toml"


# ---------------------------------------------------------------- .dockerignore

def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore matching (moby/patternmatcher): * within a segment, ** across."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_context(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether the build context holds path: the last rule matching it or a parent folder wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for exclude, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            included = not exclude
    return included


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((not negate, _pattern_regex(os.path.normpath(line.lstrip("!").lstrip("/")))))
    return rules


def test_dockerignore_sends_exactly_what_the_dockerfiles_copy():
    rules = dockerignore_rules((ROOT / ".dockerignore").read_text())
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    copied = set()
    for role in images.IMAGES:
        for word, rest in instructions(dockerfile(role)):
            if word == "COPY" and "--from=" not in rest:
                copied.update(shlex.split(rest)[:-1])
    assert copied, "no COPY found"
    for source in copied:  # every COPY source exists and is in the context
        source = source.rstrip("/")
        assert (ROOT / source).exists(), f"the Dockerfiles COPY {source}, which does not exist"
        assert in_context(source, rules), f"{source} is copied but .dockerignore leaves it out"

    def wanted(path: str) -> bool:
        return any(path == s.rstrip("/") or path.startswith(s.rstrip("/") + "/") for s in copied) \
            and "__pycache__" not in path and not path.endswith((".pyc", ".pyo"))

    sent = {p for p in tracked if in_context(p, rules)}
    assert sent == {p for p in tracked if wanted(p)}
    for junk in (".venv/bin/python", ".git/HEAD", "tests/data/abid-sample/metadata/1.json", "demo-output/x",
                 "bincounter/__pycache__/cli.cpython-311.pyc", "bincounter.egg-info/PKG-INFO", "manifests/x.yaml"):
        assert not in_context(junk, rules), f"{junk} would be sent to the Docker daemon"


def test_dockerignore_matcher_bites():
    rules = dockerignore_rules("*\n!keep/\nkeep/**/*.tmp\n")
    assert in_context("keep/a.py", rules) and not in_context("other/a.py", rules)
    assert not in_context("keep/x/y.tmp", rules) and not in_context(".venv", rules)


# ---------------------------------------------------------------- make images / make push

def run_make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env or _clean_env())


def make_built_refs(*args: str, env: dict | None = None) -> dict[str, str]:
    """role -> the reference `make -n images` builds, parsed from the docker commands it prints."""
    result = run_make("-n", "images", *args, env=env)
    assert result.returncode == 0, result.stderr
    built = {}
    for line in result.stdout.splitlines():
        argv = shlex.split(line)
        if argv[:2] == ["docker", "build"]:
            dockerfile_path, ref = argv[argv.index("--file") + 1], argv[argv.index("--tag") + 1]
            role = next(r for r, (_, path) in images.IMAGES.items() if path == dockerfile_path)
            built[role] = ref
    return built


def test_make_images_builds_every_role_under_the_python_names():
    assert default_built_refs() == {default_ref(role) for role in images.IMAGES}
    given = make_built_refs("REGISTRY=registry.example.com/team", "TAG=1.2.3")
    assert given == {r: images.image(r, registry_="registry.example.com/team", tag_="1.2.3") for r in images.IMAGES}
    env = {**_clean_env(), "BINCOUNTER_TAG": "from-env", "BINCOUNTER_REGISTRY": "reg.example:5000/x"}
    expected = {role: f"reg.example:5000/x/{repo}:from-env" for role, (repo, _) in images.IMAGES.items()}
    assert make_built_refs(env=env) == expected


def test_make_images_push_runs_docker_builds_then_pushes(tmp_path):
    log = tmp_path / "docker.log"
    fake = tmp_path / "docker"  # stands in for the docker CLI: records its arguments
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    result = run_make("push", f"DOCKER={fake}", "REGISTRY=registry.example.com/team", "TAG=1.2.3-rc1")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    refs = {r: images.image(r, registry_="registry.example.com/team", tag_="1.2.3-rc1") for r in images.IMAGES}
    builds = [c for c in calls if c[0] == "build"]
    pushes = [c for c in calls if c[0] == "push"]
    assert {(c[c.index("--file") + 1], c[c.index("--tag") + 1], c[-1]) for c in builds} == \
        {(images.IMAGES[r][1], refs[r], ".") for r in images.IMAGES}
    assert sorted(c[1] for c in pushes) == sorted(refs.values())
    assert calls.index(pushes[0]) > calls.index(builds[0])
    for role, ref in refs.items():  # each image is pushed after it is built
        assert calls.index(["push", ref]) > next(i for i, c in enumerate(calls) if c[0] == "build" and ref in c)


def test_make_images_rejects_a_bad_tag(tmp_path):
    log = tmp_path / "docker.log"
    fake = tmp_path / "docker"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    result = run_make("images", f"DOCKER={fake}", "TAG=not a tag")
    assert result.returncode != 0 and "Invalid image tag" in result.stderr
    assert not log.exists(), "docker ran with an invalid tag"


def test_make_images_with_buildah_builds_every_role_under_the_python_names():
    result = run_make("-n", "images", "BUILDER=buildah", "TAG=1.2.3")
    assert result.returncode == 0, result.stderr
    calls = [shlex.split(line) for line in result.stdout.splitlines() if "images/buildah.sh" in line]
    assert sorted(c[1:] for c in calls) == sorted(
        ["images/buildah.sh", "build", r, images.image(r, tag_="1.2.3"), images.IMAGES[r][1]] for r in images.IMAGES)
    smoke = run_make("-n", "image-smoke", "TAG=1.2.3")
    assert smoke.returncode == 0, smoke.stderr
    argv = shlex.split(next(line for line in smoke.stdout.splitlines() if "images/smoke.py" in line))
    assert argv[2:] == [f"{r}={images.image(r, tag_='1.2.3')}" for r in images.IMAGES]


def test_make_images_rejects_an_unknown_builder():
    result = run_make("images", "BUILDER=kaniko")
    assert result.returncode != 0 and "BUILDER=kaniko: expected docker" in result.stderr


def test_smoke_finds_the_uid_of_a_listening_process():
    import socket

    sys.path.insert(0, str(ROOT / "images"))
    try:
        import smoke
    finally:
        sys.path.remove(str(ROOT / "images"))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert smoke.listening_uid(port) is None  # bound, not listening
        server.listen()
        assert smoke.listening_uid(port) == os.getuid()


def test_smoke_trains_offline_with_the_current_flags(capsys):
    """The smoke test's network namespace has no route out: its training must not ask for ImageNet
    weights (the recipe's default), and it uses no deprecated spelling (the first real run of
    `make image-smoke` after the defaults changed failed on the weights download)."""
    from bincounter.cli import prepare_parser
    from bincounter.train import get_args_parser

    sys.path.insert(0, str(ROOT / "images"))
    try:
        import smoke
    finally:
        sys.path.remove(str(ROOT / "images"))
    parsed = prepare_parser(get_args_parser(add_help=False), "train").parse_args(
        ["--data", "/data/shards", "--output", "/data/model", *smoke.TRAIN_ARGS])
    assert parsed.pretrained == "" and parsed.epochs == 1
    assert "deprecated" not in capsys.readouterr().err


# ---------------------------------------------------------------- referenced images

def referenced_images(docs) -> set[str]:
    """Values of every `image` key, plus any reference to one of our repositories in any string."""
    found: set[str] = set()

    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str):
            if key == "image":
                found.add(node)
            found.update(OUR_REF.findall(node))

    for doc in docs:
        walk(doc)
    return found


def test_referenced_image_finder_bites():
    docs = [{"spec": {"containers": [{"image": "python:3.11"}]},
             "args": ["--x", "ghcr.io/acme/bincounter-server:9.9"]}]
    assert referenced_images(docs) == {"python:3.11", "ghcr.io/acme/bincounter-server:9.9"}


@functools.cache
def default_built_refs() -> frozenset[str]:
    """What a plain `make images` builds (no REGISTRY/TAG given): the names the checked-in files must use."""
    return frozenset(make_built_refs().values())


def _check_references(source: str, refs: set[str], must_include: set[str]):
    built = default_built_refs()
    unknown = {r for r in refs if r not in built and r not in THIRD_PARTY_IMAGES}
    assert not unknown, (f"{source} references images `make images` does not build (built: {sorted(built)}): "
                         f"{sorted(unknown)}. Take names from bincounter.images.image(role).")
    missing = {default_ref(r) for r in must_include} - refs
    assert not missing, f"{source} should reference {sorted(missing)}; found {sorted(refs)}"


def test_pipeline_references_only_images_make_builds():
    path = ROOT / "pipeline.yaml"
    assert path.exists(), "pipeline.yaml is missing: run `python pipeline.py` and commit it"
    _check_references("pipeline.yaml", referenced_images(yaml.safe_load_all(path.read_text())), {"pipeline"})


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "manifests").rglob("kustomization.yaml"))


def test_rendered_manifests_reference_only_images_make_builds():
    dirs = kustomizations()
    assert len(dirs) >= 4, f"expected the base, trainer-v2 and three overlays under manifests/, found {dirs}"
    every: set[str] = set()
    for d in dirs:
        rendered = subprocess.run(["kubectl", "kustomize", str(d)], capture_output=True, text=True, timeout=60)
        assert rendered.returncode == 0, f"kubectl kustomize {d}: {rendered.stderr}"
        refs = referenced_images(yaml.safe_load_all(rendered.stdout))
        _check_references(str(d.relative_to(ROOT)), refs, set())
        every |= refs
    overlays = [d for d in dirs if d.parent.name == "overlays"]
    assert overlays, "expected manifests/overlays/<name>/kustomization.yaml"
    _check_references("the rendered manifests", every, {"trainer", "server"})


# ---------------------------------------------------------------- requirements resolution

def resolve(command: list[str], python: Path) -> tuple[int, dict[str, str], str]:
    """Run a Dockerfile's `uv pip install` here as a dry run into an empty environment.

    Returns (exit status, {package: version} it would install, output)."""
    result = subprocess.run([str(UV), *command[1:], "--dry-run", "--python", str(python)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_CONFIG": "1", "NO_COLOR": "1"})
    output = result.stdout + result.stderr
    would = dict(re.findall(r"^ \+ ([\w.-]+)==(\S+)$", output, flags=re.M))
    return result.returncode, {_norm(k): v for k, v in would.items()}, output


def pinned() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_norm(name)] = version.split(";")[0].strip()
    return pins


@pytest.fixture(scope="module")
def empty_env(tmp_path_factory) -> Path:
    """An empty virtual environment, like the Dockerfiles' fresh /opt/venv."""
    venv = tmp_path_factory.mktemp("uv") / "venv"
    subprocess.run([str(UV), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=120)
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def resolutions(empty_env) -> dict[str, tuple[list[str], int, dict[str, str], str]]:
    """role -> (command, exit status, packages, output) of its dependency install, resolved in parallel.

    The CPU images' first step fetches torch's CPU build from download.pytorch.org, which this machine
    cannot reach; test_dockerfile_pins_agree_with_pyproject checks its pins instead, and the resolution
    below sees the default (CUDA) build of the same version, whose other requirements are the same."""
    commands = {}
    for role in images.IMAGES:
        installs = [c for c in uv_installs(dockerfile(role)) if CPU_TORCH_INDEX not in c]
        assert len(installs) == 1, f"{role}: expected one dependency install, found {installs}"
        commands[role] = installs[0]
    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        futures = {role: pool.submit(resolve, cmd, empty_env) for role, cmd in commands.items()}
        return {role: (commands[role], *f.result()) for role, f in futures.items()}


@pytest.mark.parametrize("role", list(images.IMAGES))
def test_image_requirements_resolve_with_the_locked_versions(role, resolutions):
    command, status, packages, output = resolutions[role]
    assert "--constraint" in command and "images/constraints.txt" in command
    assert status == 0, f"{role}: `{shlex.join(command)}` does not resolve:\n{output}"
    assert "torch" in packages and "pillow" in packages, output
    pins = pinned()
    unpinned = {p: v for p, v in packages.items() if pins.get(p) != v}
    assert not unpinned, (f"{role} would install versions images/constraints.txt does not pin: {unpinned}. "
                          "Run `.venv/bin/python images/lock.py` and commit images/constraints.txt.")


def test_resolution_check_bites(empty_env, tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(CONSTRAINTS.read_text().replace("\ntorch==", "\ntorch==2.0.0\n# was torch=="))
    command = ["uv", "pip", "install", "--constraint", str(constraints), "--requirement", "pyproject.toml"]
    status, _, output = resolve(command, empty_env)
    assert status != 0 and "torch" in output


# ---------------------------------------------------------------- entrypoints import with the image's packages

# Runs in a fresh interpreter. For each image in turn, it imports the image's modules with every
# third-party package that image does not install blocked for `import` statements in bincounter or
# component code (a third-party package's own imports are its metadata's business, checked by the
# resolution). The hook sits on builtins.__import__, which sees every import statement, even of a module
# an earlier image loaded, so one interpreter checks all images and pays for importing torch once.
BLOCKER = textwrap.dedent('''
    import builtins, importlib, importlib.metadata, json, re, sys, traceback
    plan = json.loads(sys.argv[1])  # [{"role": ..., "allowed": [...], "modules": [...]}, ...]
    owners = importlib.metadata.packages_distributions()
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
    real_import, current = builtins.__import__, {}

    def checked_import(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__") or ""
        top = name.partition(".")[0]
        if level == 0 and importer.startswith(("bincounter", "components")) and top not in sys.stdlib_module_names:
            dists = owners.get(top, [])
            if dists and not any(norm(d) in current["allowed"] for d in dists):
                raise ModuleNotFoundError(f"{importer} imports {name!r} (distribution {', '.join(dists)}), "
                                          f"which the {current['role']} image does not install")
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = checked_import
    for step in plan:
        current.update(role=step["role"], allowed=set(step["allowed"]))
        for name in [m for m in sys.modules if m.startswith(("bincounter", "components"))]:
            del sys.modules[name]  # re-run their import statements under this image's packages
        try:
            for module in step["modules"]:
                importlib.import_module(module)
            print(json.dumps({"role": step["role"], "imported": len(step["modules"])}))
        except BaseException:
            print(json.dumps({"role": step["role"], "error": traceback.format_exc(limit=-4)}))
''')


def import_with_only(plan: list[dict], extra_path: Path | None = None) -> dict[str, dict]:
    """role -> {"imported": N} or {"error": traceback}, for a plan of {role, allowed, modules}."""
    env = {**_clean_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(extra_path or ""), str(ROOT)]))}
    plan = [{**step, "allowed": sorted(step["allowed"])} for step in plan]
    result = subprocess.run([sys.executable, "-c", BLOCKER, json.dumps(plan)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {line["role"]: line for line in lines}


def image_packages(role: str, resolutions) -> set[str]:
    _, status, packages, output = resolutions[role]
    assert status == 0, output
    names = {p for p in packages if not (role in CPU_ROLES and CUDA_ONLY.match(p))}
    return names | {"bincounter"}


def _top_imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(imported module, line) of every import in the tree, skipping those guarded by `except ImportError`."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                or isinstance(h.type, ast.Tuple) and any(getattr(e, "id", "") in ("ImportError", "ModuleNotFoundError")
                                                         for e in h.type.elts)
                for h in node.handlers):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return found


def static_needs(entry_files: list[Path]) -> tuple[dict[str, str], list[str]]:
    """Third-party top-level packages imported anywhere (function bodies too) by the entry files and the
    bincounter modules they reach -> where; and those bincounter modules. Catches the lazy imports (all
    of a KFP component's imports are in its body) that importing a module never runs."""
    needs: dict[str, str] = {}
    reached: set[str] = set()
    seen: set[Path] = set()
    todo = list(entry_files)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name, line in _top_imports(ast.parse(path.read_text(), str(path))):
            top = name.partition(".")[0]
            if top == "bincounter":
                spec_path = _module_file(name)
                if spec_path:
                    todo.append(spec_path)
                    reached.add(".".join(spec_path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
            elif top not in sys.stdlib_module_names and top not in ("components", "__future__"):
                needs.setdefault(top, f"{path.relative_to(ROOT)}:{line}")
    return needs, sorted(reached)


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):  # `from bincounter.x import y`: y may be a name, not a module
        base = ROOT.joinpath(*parts[:n])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def entry_modules(role: str) -> tuple[list[str], list[str]]:
    """(modules to import, modules not written yet) for a role; the pipeline adds every component."""
    modules = list(images.ENTRYPOINT_MODULES[role])
    if role == "pipeline":
        modules += sorted(f"components.{p.stem}" for p in (ROOT / "components").glob("*.py") if p.stem != "__init__")
    present = [m for m in modules if m.split(".")[0] not in ("bincounter", "components") or _module_file(m)]
    return present, sorted(set(modules) - set(present))


@functools.cache
def _owners() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions_of(top: str) -> list[str]:
    return [_norm(d) for d in _owners().get(top, [])]


@pytest.fixture(scope="module")
def entrypoint_checks(resolutions) -> dict[str, dict]:
    """role -> what its entrypoints need (static) and whether they import with only its packages."""
    checks = {}
    for role in images.IMAGES:
        modules, absent = entry_modules(role)
        if role == "pipeline" and not any(m.startswith("components.") for m in modules):
            absent.append("components/*.py")
        needs, reached = static_needs([f for f in map(_module_file, modules) if f])
        checks[role] = {"modules": list(dict.fromkeys(modules + reached)), "absent": absent, "needs": needs,
                        "allowed": image_packages(role, resolutions)}
    plan = [{"role": role, "allowed": c["allowed"], "modules": c["modules"]} for role, c in checks.items()]
    imported = import_with_only(plan)
    for role, check in checks.items():
        check["imported"] = imported.get(role, {"error": "no result"})
    return checks


@pytest.mark.parametrize("role", list(images.IMAGES))
def test_entrypoints_import_with_only_the_image_packages(role, entrypoint_checks):
    check = entrypoint_checks[role]
    allowed, needs = check["allowed"], check["needs"]
    # Static: every package imported anywhere on these modules' paths (lazy imports included).
    unknown = {top: where for top, where in needs.items() if not _distributions_of(top)}
    assert not unknown, f"{role}: imports of packages not installed even in the project's environment: {unknown}"
    lacking = {top: where for top, where in needs.items() if not set(_distributions_of(top)) & allowed}
    assert not lacking, (f"{role} image lacks packages its code imports: {lacking}. Add them to the extra its "
                         "Dockerfile installs (pyproject.toml), then run images/lock.py.")
    # Dynamic: the entrypoints and every bincounter module they reach import, all else blocked.
    assert check["imported"].get("imported") == len(check["modules"]), f"{role}: {check['imported'].get('error')}"
    if check["absent"]:
        pytest.skip(f"{role}: checked {len(check['modules'])} modules; not written yet, so not checked: "
                    f"{check['absent']}")


def test_import_blocker_bites(tmp_path, resolutions):
    probe = tmp_path / "bincounter_probe.py"  # stands for a bincounter module that imports kfp at the top
    probe.write_text("import kfp\n")
    plan = [{"role": "pipeline", "allowed": image_packages("pipeline", resolutions), "modules": ["bincounter_probe"]},
            {"role": "server", "allowed": image_packages("server", resolutions), "modules": ["bincounter_probe"]}]
    result = import_with_only(plan, tmp_path)
    assert result["pipeline"] == {"role": "pipeline", "imported": 1}
    assert "'kfp'" in result["server"]["error"] and "server image does not install" in result["server"]["error"]


def test_static_scan_bites(tmp_path, monkeypatch):
    code = tmp_path / "lazy.py"
    code.write_text("def f():\n    import kfp\n    from kserve import Model\n"
                    "try:\n    import onnx\nexcept ImportError:\n    pass\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    needs, _ = static_needs([code])
    assert set(needs) == {"kfp", "kserve"}, needs  # the guarded optional import is not a need


# ---------------------------------------------------------------- bincounter/images.py

def test_image_names_follow_the_environment_and_reject_bad_input(monkeypatch):
    monkeypatch.setenv("BINCOUNTER_REGISTRY", "registry.example.com:5000/ml/")
    monkeypatch.setenv("BINCOUNTER_TAG", "2.0.0-rc1")
    assert images.image("server") == "registry.example.com:5000/ml/bincounter-server:2.0.0-rc1"
    assert images.image("trainer", tag_="x") == "registry.example.com:5000/ml/bincounter-trainer:x"
    with pytest.raises(KeyError, match="Only trainer, pipeline, server"):
        images.image("notebook")
    with pytest.raises(ValueError, match="Invalid image tag"):
        images.image("server", tag_="-x")
    with pytest.raises(ValueError, match="Invalid image registry"):
        images.image("server", registry_="Registry With Spaces")
