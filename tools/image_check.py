"""The image, built the Dockerfile's way without Docker, proven to start.

    python -m tools.with_stack .venv/bin/python -m tools.image_check [--lock PATH]

(`make image-check`; CI runs it before `make test`.) There is no Docker engine
here, so this follows the Dockerfile itself, instruction by instruction, in a
fresh folder outside the checkout whose `root/` stands for the image's `/`:

1. the Python of the Dockerfile's FROM tag (same minor version) stands for the
   base image's `python`;
2. the build stage's ENV, WORKDIR and COPY are applied and its RUN commands run
   as written (`sh -c`, as Docker's shell form), with /opt, /app and /src moved
   under `root/`: the same `python -m venv`, the same `pip install` flags on the
   same lock (`--lock PATH` puts another file in its place), `pip check`, the
   removal of pip and setuptools, compileall; the final stage's ENV and WORKDIR
   give the services' environment (PYTHONPATH=/app, the venv first on PATH); its
   RUN lines (creating the user) are not run;
3. it checks that the result is the image's, not the checkout's: `services` comes
   from the copy, no path of the checkout is on sys.path, no dev package imports;
4. with the DATABASE_URL and NATS_URL of a private stack, each service's
   `python -m services.<name> migrate` must exit 0, then each service
   (`python -m services.<name>`, tools.suite's environment) must answer its gRPC
   health check with SERVING, and stop cleanly on SIGTERM;
5. every module of services/ and usagebilling/ must import in the image.

A failure names the step, the service and, from the service's log, the module
that could not be imported. Exit status 0 when every step passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tools.devstack import REPO_ROOT
from tools.suite import SERVICES, Suite

DOCKERFILE = REPO_ROOT / "Dockerfile"
RUNTIME_LOCK = "requirements/runtime.lock"
# The image's own folders (WORKDIR, COPY destinations, the venv): moved under root/.
IMAGE_ROOTS = ("/opt", "/app", "/src")
# As .dockerignore: no byte code or stubs from the checkout.
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyi")
# Packages only the dev or k8s venv has: any of them importable means a leak.
DEV_ONLY_MODULES = ("pytest", "hypothesis", "grpc_tools", "mypy", "yaml", "trustme")
# Variables that would put something other than the image's venv and app on the path.
LEAKY_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONUSERBASE")
_MISSING_MODULE = re.compile(r"(?:ModuleNotFoundError|ImportError): .*")
_FROM_PYTHON = re.compile(r"^python:(\d+\.\d+)\b")


class ImageCheckError(RuntimeError):
    """A step failed; the message says which and why."""


def _log(message: str) -> None:
    print(f"image-check: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# The Dockerfile


@dataclass
class Stage:
    """One FROM ... stage: its instructions in order, ENV and WORKDIR as given."""

    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)


def instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, inside a continuation too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        keyword, _, arguments = logical.partition(" ")
        yield keyword.upper(), arguments.strip()
    if pending:
        raise ImageCheckError("Dockerfile ends inside a continued line")


def stages(text: str) -> list[Stage]:
    """The Dockerfile's stages, in order."""
    found: list[Stage] = []
    for keyword, arguments in instructions(text):
        if keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(words[0], name))
        elif not found:
            if keyword != "ARG":
                raise ImageCheckError(f"Dockerfile: {keyword} before FROM")
        else:
            found[-1].steps.append((keyword, arguments))
    if not found:
        raise ImageCheckError("Dockerfile has no FROM")
    return found


def python_minor(stage: Stage) -> str:
    """ "3.11" from FROM python:3.11-slim-bookworm; the check needs an official Python image."""
    match = _FROM_PYTHON.match(stage.base)
    if not match:
        raise ImageCheckError(f"FROM {stage.base}: not a python:<major>.<minor> image")
    return match.group(1)


def env_assignments(arguments: str) -> list[tuple[str, str]]:
    """ENV K=V [K2=V2 ...] (the key=value form only)."""
    pairs = []
    for word in shlex.split(arguments):
        key, sep, value = word.partition("=")
        if not sep:
            raise ImageCheckError(f"ENV {arguments}: only the KEY=VALUE form is supported")
        pairs.append((key, value))
    return pairs


def pip_install_commands(text: str) -> list[str]:
    """The build's pip commands (install, check), as written in the Dockerfile."""
    commands = []
    for stage in stages(text):
        for keyword, arguments in stage.steps:
            if keyword == "RUN":
                commands += [
                    part.strip()
                    for part in arguments.split("&&")
                    if re.search(r"\bpip (install|check)\b", part)
                ]
    return commands


# ---------------------------------------------------------------------------
# Building the image's venv and app


@dataclass
class Image:
    """The built image under `root`: its venv's python, its environment and workdir."""

    root: Path
    python: Path
    env: dict[str, str]
    workdir: Path
    minor: str


class Builder:
    def __init__(self, work: Path, lock: Path, interpreter: str | None) -> None:
        self.work = work
        self.root = work / "root"
        self.lock = lock
        self.interpreter = interpreter
        self.log_dir = work / "logs"

    def host_path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def rewrite(self, command: str) -> str:
        """The command with the image's absolute folders moved under root/."""
        roots = "|".join(re.escape(r) for r in IMAGE_ROOTS)
        return re.sub(
            rf"(?<![\w./-])({roots})(?=/|\s|$)",
            lambda m: str(self.root) + m.group(1),
            command,
        )

    def find_interpreter(self, minor: str) -> str:
        if self.interpreter:
            candidate: str | None = self.interpreter
        else:
            # The base interpreter of the venv we run in, or python<minor> on PATH.
            base = Path(sys.base_prefix) / "bin" / f"python{minor}"
            candidate = str(base) if base.exists() else shutil.which(f"python{minor}")
        if not candidate:
            raise ImageCheckError(f"no python{minor} here (the Dockerfile's FROM): use --python")
        found = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if found != minor:
            raise ImageCheckError(
                f"{candidate} is Python {found or '?'}; the Dockerfile's is {minor}"
            )
        return candidate

    def base_env(self, python_bin: Path) -> dict[str, str]:
        """The host environment without anything that leads to the checkout or the dev venv."""
        env = {k: v for k, v in os.environ.items() if k not in LEAKY_VARIABLES}
        entries = [
            p for p in env.get("PATH", "").split(os.pathsep) if p and not _inside(p, REPO_ROOT)
        ]
        # `python` in the Dockerfile is the base image's: here the chosen interpreter.
        env["PATH"] = os.pathsep.join([str(python_bin), *entries])
        return env

    def copy(self, arguments: str, workdir: str, stage_names: set[str]) -> None:
        words = shlex.split(arguments)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        *sources, destination = paths
        dest = destination if destination.startswith("/") else f"{workdir}/{destination}"
        if any(f.startswith("--from=") for f in flags):
            stage = next(f for f in flags if f.startswith("--from=")).partition("=")[2]
            # Between stages of one root: the same path on both sides is already there.
            if stage not in stage_names or sources != [destination]:
                raise ImageCheckError(f"COPY {arguments}: only same-path copies between stages")
            if not self.host_path(dest).exists():
                raise ImageCheckError(f"COPY {arguments}: {dest} was not built")
            return
        for source in sources:
            origin = self.lock if source == RUNTIME_LOCK else REPO_ROOT / source
            target = self.host_path(dest)
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=COPY_IGNORE, dirs_exist_ok=True)
            else:
                if dest.endswith("/"):
                    target = target / origin.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)

    def build(self, dockerfile: str) -> Image:
        all_stages = stages(dockerfile)
        minor = python_minor(all_stages[-1])
        for stage in all_stages:
            if python_minor(stage) != minor:
                raise ImageCheckError("the stages use different Python versions")
        interpreter = self.find_interpreter(minor)
        python_bin = self.work / "base-bin"
        python_bin.mkdir(parents=True)
        shim = python_bin / "python"
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(interpreter)} "$@"\n')
        shim.chmod(0o755)
        _log(f"Python {minor} from the Dockerfile's FROM: {interpreter}")
        _log(f"lock: {self.lock}")
        self.log_dir.mkdir(parents=True)

        names = {s.name for s in all_stages if s.name}
        final_env: dict[str, str] = {}
        final_workdir = "/"
        for index, stage in enumerate(all_stages):
            final = index == len(all_stages) - 1
            env = self.base_env(python_bin)
            workdir = "/"
            for keyword, arguments in stage.steps:
                if keyword == "ENV":
                    for key, value in env_assignments(arguments):
                        env[key] = _expand(self.rewrite(value), env)
                elif keyword == "WORKDIR":
                    workdir = arguments if arguments.startswith("/") else f"{workdir}/{arguments}"
                    self.host_path(workdir).mkdir(parents=True, exist_ok=True)
                elif keyword == "COPY":
                    self.copy(arguments, workdir, names)
                elif keyword == "RUN" and final:
                    _log(f"not run (the final stage's system set-up): RUN {arguments[:60]}...")
                elif keyword == "RUN":
                    self.run(arguments, env, workdir)
                elif keyword in ("ARG", "EXPOSE", "USER", "CMD", "LABEL", "ENTRYPOINT"):
                    continue
                else:
                    raise ImageCheckError(f"Dockerfile: {keyword} is not supported here")
            if final:
                final_env, final_workdir = env, workdir
        python = self.host_path("/opt/venv/bin/python")
        if not python.exists():
            raise ImageCheckError("the build made no /opt/venv/bin/python")
        return Image(self.root, python, final_env, self.host_path(final_workdir), minor)

    def run(self, command: str, env: Mapping[str, str], workdir: str) -> None:
        rewritten = self.rewrite(command)
        _log(f"RUN {command}")
        result = subprocess.run(
            ["sh", "-c", rewritten],
            cwd=self.host_path(workdir),
            env=dict(env),
            capture_output=True,
            text=True,
            check=False,
        )
        output = result.stdout + result.stderr
        with (self.log_dir / "build.log").open("a") as log:
            log.write(f"$ {rewritten}\n{output}\n")
        if result.returncode != 0:
            raise ImageCheckError(
                f"the build failed (as `docker build` would), exit {result.returncode}:"
                f" RUN {command}\n{_tail(output)}"
            )


def _inside(path: str, folder: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(folder)
    except OSError:
        return False


def _expand(value: str, env: Mapping[str, str]) -> str:
    """$VAR and ${VAR} from the stage's environment, as Docker expands ENV values."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------------------
# Checking the image


def missing_modules(log: str) -> list[str]:
    """The import errors a log shows ("ModuleNotFoundError: No module named 'orjson'")."""
    return list(dict.fromkeys(m.group(0).strip() for m in _MISSING_MODULE.finditer(log)))


def _distribution_hint(messages: Iterable[str]) -> str:
    """Which distribution (of the dev venv) provides the missing module, when known."""
    providers = importlib.metadata.packages_distributions()
    hints = []
    for message in messages:
        match = re.search(r"No module named '([\w.]+)'", message)
        if match:
            top = match.group(1).split(".")[0]
            for dist in providers.get(top, []):
                hints.append(
                    f"'{top}' comes from {dist}: add it to requirements/runtime.in, run `make lock`"
                )
    return ("\n  " + "\n  ".join(dict.fromkeys(hints))) if hints else ""


def failure(what: str, log_path: Path) -> ImageCheckError:
    """The error for a service step, naming the missing module found in its log."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    errors = missing_modules(text)
    reason = ("\n  " + "\n  ".join(errors)) if errors else ""
    return ImageCheckError(
        f"{what}{reason}{_distribution_hint(errors)}\n  log {log_path}, last lines:\n{_tail(text)}"
    )


ISOLATION_PROBE = """
import importlib.util, json, os, sys
import services, usagebilling
print(json.dumps({
    "services": services.__file__,
    "usagebilling": usagebilling.__file__,
    "path": [os.path.abspath(p) for p in sys.path],
    "prefix": sys.prefix,
    "dev": [m for m in %r if importlib.util.find_spec(m) is not None],
}))
"""

IMPORT_ALL_PROBE = """
import importlib, pkgutil, sys, traceback
failed = 0
for package in ("services", "usagebilling"):
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if info.name.endswith(".__main__"):
            continue  # the entry points: migrate and serve ran them
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed += 1
            print(f"{info.name}: {type(exc).__name__}: {exc}")
print(f"{failed} failed")
sys.exit(1 if failed else 0)
"""


def check_isolation(image: Image) -> None:
    """The image's python sees the copied app and its own venv only."""
    result = subprocess.run(
        [str(image.python), "-c", ISOLATION_PROBE % (DEV_ONLY_MODULES,)],
        cwd=image.workdir,
        env=image.env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ImageCheckError(f"the image's python cannot import the app:\n{_tail(result.stderr)}")
    seen = json.loads(result.stdout)
    problems = []
    for package in ("services", "usagebilling"):
        if not _inside(seen[package], image.root):
            problems.append(f"{package} imported from {seen[package]}, not the image's copy")
    problems += [f"{p} on sys.path (the checkout)" for p in seen["path"] if _inside(p, REPO_ROOT)]
    if not _inside(seen["prefix"], image.root):
        problems.append(f"sys.prefix {seen['prefix']} is not the image's venv")
    problems += [f"{m} importable: a dev package leaked into the image" for m in seen["dev"]]
    if problems:
        raise ImageCheckError("the venv is not the image's:\n  " + "\n  ".join(problems))
    _log("isolated: app from the copy, venv's own site-packages only, no dev package")


def _service_env(image: Image) -> dict[str, str]:
    """The image's environment, for tools.suite to lay over ours: the variables
    that could lead back to the checkout are emptied (Python ignores an empty one)
    unless the image sets them (PYTHONPATH)."""
    cleared = dict.fromkeys(LEAKY_VARIABLES, "")
    return cleared | {k: v for k, v in image.env.items() if not k.startswith("USAGEBILLING_")}


def check_services(image: Image, database_url: str, nats_url: str, timeout: float) -> None:
    """migrate, then serve until SERVING, each service from the image."""
    log_dir = image.root.parent / "logs"
    suite = Suite(
        database_url,
        nats_url,
        log_dir,
        python=str(image.python),
        cwd=image.workdir,
    )
    # The image's environment under tools.suite's settings (tokens, stack, ports,
    # each service's NATS user).
    suite.extra_env = _service_env(image)

    for service in SERVICES:
        log_path = log_dir / f"{service}-migrate.log"
        started = time.monotonic()
        with log_path.open("wb") as log:
            try:
                code = subprocess.run(
                    [str(image.python), "-m", f"services.{service}", "migrate"],
                    cwd=image.workdir,
                    env=suite.service_env(service),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                raise failure(f"{service} migrate ran over {timeout} s", log_path) from None
        if code != 0:
            raise failure(f"`python -m services.{service} migrate` exited with {code}", log_path)
        _log(f"{service} migrate: exit 0 in {time.monotonic() - started:.1f} s")

    try:
        started = time.monotonic()
        for service in SERVICES:
            suite.start_service(service)
        for service in SERVICES:
            try:
                suite.wait_healthy(service, timeout)
            except RuntimeError as exc:
                suite.stop()
                log_path = log_dir / f"{service}.log"
                raise failure(f"`python -m services.{service}`: {exc}", log_path) from None
            _log(f"{service}: SERVING ({time.monotonic() - started:.1f} s after start)")
        codes = {}
        for service in reversed(SERVICES):
            codes[service] = suite.stop_service(service, signal.SIGTERM, timeout=30)
        bad = {s: c for s, c in codes.items() if c != 0}
        if bad:
            service = next(iter(bad))
            raise failure(
                f"{service} exited with {bad[service]} on SIGTERM", log_dir / f"{service}.log"
            )
        _log("all stopped cleanly on SIGTERM (exit 0)")
    finally:
        suite.stop()


def check_imports(image: Image) -> None:
    """Every module of the app imports in the image (also those startup does not reach)."""
    result = subprocess.run(
        [str(image.python), "-c", IMPORT_ALL_PROBE],
        cwd=image.workdir,
        env=_service_env(image),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        lines = [line for line in result.stdout.splitlines() if ":" in line]
        raise ImageCheckError(
            "modules that do not import in the image:\n  "
            + "\n  ".join(lines)
            + _distribution_hint(lines)
            + (f"\n{_tail(result.stderr)}" if result.stderr.strip() else "")
        )
    _log(f"every module of services/ and usagebilling/ imports ({result.stdout.strip()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.image_check", description=__doc__)
    parser.add_argument(
        "--lock",
        type=Path,
        default=REPO_ROOT / RUNTIME_LOCK,
        help=f"the file installed in place of {RUNTIME_LOCK} (e.g. a copy lacking a package)",
    )
    parser.add_argument("--python", help="the interpreter standing for the base image's python")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per service step")
    parser.add_argument("--keep", action="store_true", help="keep the build folder and logs")
    args = parser.parse_args(argv)

    database_url = os.environ.get("DATABASE_URL")
    nats_url = os.environ.get("NATS_URL")
    if not (database_url and nats_url):
        _log("needs DATABASE_URL and NATS_URL: run it as `make image-check` (tools.with_stack)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="ub-image-check-"))
    if _inside(str(work), REPO_ROOT):
        raise SystemExit("the build folder must be outside the checkout")
    started = time.monotonic()
    ok = False
    try:
        image = Builder(work, args.lock.resolve(), args.python).build(DOCKERFILE.read_text())
        _log(f"built in {time.monotonic() - started:.1f} s under {image.root}")
        check_isolation(image)
        check_services(image, database_url, nats_url, args.timeout)
        check_imports(image)
        ok = True
    except ImageCheckError as exc:
        _log(f"FAILED: {exc}")
    finally:
        if args.keep or not ok:
            _log(f"build folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if ok:
        _log(f"passed in {time.monotonic() - started:.1f} s: the image's venv migrates and serves")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
