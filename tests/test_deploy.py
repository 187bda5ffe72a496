"""The deployment recipes in deploy/ (docs/deploy.md), checked as far as a
machine without systemd running, Docker, Slurm or a cluster allows."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shmrunner.config import DaemonSettings, resolve

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DAEMON_UNIT = DEPLOY / "shmrunner-daemon.service"
AGENT_UNIT = DEPLOY / "shmrunner-agent@.service"
INSTALLED = "/opt/shmrunner"  # where the units and the image put shmrunner


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert match and match.group(2) in units, value
    return float(match.group(1)) * units[match.group(2)]


# --- docs/deploy.md ------------------------------------------------------------------------


def test_the_settings_in_deploy_md_are_real_settings() -> None:
    import dataclasses

    from shmrunner.config import Settings

    blocks = re.findall(r"^```yaml\n(.*?)^```", (REPO / "docs" / "deploy.md").read_text(),
                        re.M | re.S)
    assert len(blocks) >= 2
    for block in blocks:
        for section, values in yaml.safe_load(block).items():
            known = {f.name for f in dataclasses.fields(getattr(Settings(), section))}
            assert set(values) <= known, (section, set(values) - known)


# --- systemd -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here: the units are only parsed "
                    "(test_systemd_units_set_what_shmrunner_needs)")
    shmrunner = shutil.which("shmrunner", path=os.path.dirname(sys.executable))
    assert shmrunner, "the shmrunner console script next to this Python"
    copies = []
    # verify wants existing executables and a concrete instance of a template
    for source, name in ((DAEMON_UNIT, DAEMON_UNIT.name),
                         (AGENT_UNIT, "shmrunner-agent@1.service")):
        text = source.read_text()
        assert f"{INSTALLED}/bin/shmrunner " in text
        (tmp_path / name).write_text(text.replace(f"{INSTALLED}/bin/shmrunner", shmrunner))
        copies.append(f"./{name}")
    done = subprocess.run([analyze, "verify", "--man=no", *copies], cwd=tmp_path,
                          capture_output=True, text=True, timeout=90)
    if done.returncode != 0 and "Failed to" in done.stderr and "bus" in done.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {done.stderr.strip()[:200]}")
    # It only warns (exit 0) about unknown keys and bad values: any output fails.
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_systemd_units_set_what_shmrunner_needs() -> None:
    drain = DaemonSettings().drain_timeout
    for path, command in ((DAEMON_UNIT, "daemon"), (AGENT_UNIT, "worker")):
        service = unit(path)["Service"]
        exec_start = shlex.split(service["ExecStart"])
        assert exec_start[:2] == [f"{INSTALLED}/bin/shmrunner", command], exec_start
        # the private runtime directory of the default sockets, and where it is
        assert service["RuntimeDirectory"] == "shmrunner"
        assert service["RuntimeDirectoryMode"] == "0700"
        assert "XDG_RUNTIME_DIR=%t" in service["Environment"].split()
        assert service.get("User") == "shmrunner" and service["UMask"] == "0077"
        assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
        assert service["Restart"] in ("on-failure", "always")
        assert service["RestartPreventExitStatus"] == "2"  # a bad setting: never retried
        assert int(service["LimitNOFILE"]) >= 4096
    daemon = unit(DAEMON_UNIT)["Service"]
    assert daemon["StateDirectory"] == "shmrunner" and daemon["StateDirectoryMode"] == "0700"
    assert "XDG_STATE_HOME=%S" in daemon["Environment"].split()
    assert "--config" in daemon["ExecStart"]
    assert seconds(daemon["TimeoutStopSec"]) > drain, "SIGKILL would cut the drain short"
    agent = unit(AGENT_UNIT)["Service"]
    assert agent["Restart"] == "always"  # an agent never welcomed exits 1: try again
    assert "%i" in agent["ExecStart"]


# --- container ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def test_dockerfile_runs_unprivileged_and_drains_on_stop() -> None:
    steps = dockerfile()
    kinds = [kind for kind, _ in steps]
    assert kinds[0] == "FROM" and "python:3" in steps[0][1]
    (user,) = [args for kind, args in steps if kind == "USER"]
    assert user not in ("root", "0")
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    assert ("STOPSIGNAL", "SIGTERM") in steps
    entry = [args for kind, args in steps if kind == "ENTRYPOINT"]
    assert entry == ['["shmrunner"]']
    (cmd,) = [yaml.safe_load(args) for kind, args in steps if kind == "CMD"]
    assert cmd[0] == "daemon" and "--config" in cmd
    env = " ".join(args for kind, args in steps if kind == "ENV")
    assert "XDG_STATE_HOME=/var/lib" in env and "XDG_RUNTIME_DIR=/run" in env
    (volume,) = [yaml.safe_load(args) for kind, args in steps if kind == "VOLUME"]
    assert volume == ["/var/lib/shmrunner"]  # the journal survives the container
    # The uid the Kubernetes manifest runs as is the image's user.
    useradd = next(args for kind, args in steps if kind == "RUN" and "useradd" in args)
    assert f"--uid {_k8s_uid()}" in useradd and user in useradd
    assert "install -d -m 0700 -o shmrunner" in useradd


@pytest.mark.timeout(600)
def test_dockerfile_install_and_check_commands_run_in_a_fresh_venv(tmp_path: Path) -> None:
    """The Dockerfile's COPY lines and the RUN lines that install and check
    shmrunner, under a temporary root instead of the image's /. The RUN line
    that adds the system user needs root and is not run here."""
    root = tmp_path / "root"
    ran = []
    for kind, args in dockerfile():
        if kind == "COPY":
            *sources, dest = shlex.split(args)
            target = root / dest.lstrip("/")
            for source in sources:
                if dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    copy_to = target / Path(source).name
                else:
                    copy_to = target
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, copy_to,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(REPO / source, copy_to)
        elif kind == "RUN" and INSTALLED in args:
            command = args.replace(INSTALLED, str(root / INSTALLED.lstrip("/")))
            command = re.sub(r"(?<![\w/])/src\b", str(root / "src"), command)
            env = dict(os.environ)
            env.pop("PYTHONPATH", None)
            env.pop("VIRTUAL_ENV", None)
            # `python` is the image's interpreter: here, the one running the tests
            env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])
            done = subprocess.run(["/bin/sh", "-c", command], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=500)
            if done.returncode != 0 and "pip install" in command and re.search(
                    r"No matching distribution|Could not find a version|Network is unreachable|"
                    r"Failed to establish", done.stderr + done.stdout):
                pytest.skip("pip cannot reach a package index from here to install the "
                            f"dependencies: {done.stderr.strip().splitlines()[-1][:200]}")
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            ran.append(command)
    assert len(ran) >= 2, "the install and the check RUN lines"
    venv = root / INSTALLED.lstrip("/")
    # The installed copy is the one from the COPY lines, not this checkout.
    done = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import shmrunner; print(shmrunner.__file__)"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    assert str(venv) in done.stdout, done.stdout


# --- Kubernetes ------------------------------------------------------------------------------


def manifest() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s-agents.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs if doc}


def _k8s_uid() -> int:
    return int(manifest()["Deployment"]["spec"]["template"]["spec"]["securityContext"]
               ["runAsUser"])


def test_k8s_manifest_is_a_deployment_of_agents_with_keys_from_a_secret() -> None:
    docs = manifest()
    assert set(docs) == {"Secret", "Deployment"}
    secret, deployment = docs["Secret"], docs["Deployment"]
    assert secret["apiVersion"] == "v1" and deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    assert spec["replicas"] >= 1
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60  # time to drain on SIGTERM
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    (container,) = pod["containers"]
    assert container["args"][0] == "worker"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # Keys: the Secret, mounted read-only, readable by the pod's group only.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    key_volume = next(v for v in volumes.values() if "secret" in v)
    assert key_volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert key_volume["secret"]["defaultMode"] & 0o077 == 0o040  # group read, no more
    key_mount = mounts[key_volume["name"]]
    assert key_mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name in ("SHMRUNNER_WORKER__CURVE_SECRET_KEY", "SHMRUNNER_WORKER__CURVE_SERVER_KEY"):
        path = Path(env[name])
        assert str(path.parent) == key_mount["mountPath"], (name, path)
        assert path.name in secret["stringData"], (name, "not a key of the Secret")
    assert env["SHMRUNNER_WORKER__CONNECT"].startswith("tcp://")
    # shmrunner itself accepts every variable and value the manifest sets.
    plain = {k: v for k, v in env.items() if v is not None}
    settings = resolve(environ=plain, sections=("worker",)).worker
    assert settings.connect == env["SHMRUNNER_WORKER__CONNECT"]
    assert settings.join_timeout is not None and settings.join_timeout > 0
    assert settings.curve_secret_key and settings.curve_server_key


# --- Slurm ---------------------------------------------------------------------------------


def test_slurm_script_is_valid_bash_and_drains_before_the_time_limit() -> None:
    script = DEPLOY / "slurm-agents.sbatch"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n")
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert re.fullmatch(r"(B:)?TERM@\d+", directives["signal"]), directives
    assert "ntasks-per-node" in directives
    assert re.search(r"^srun .*\bworker\b", text, re.M)
    for name in re.findall(r"\bSHMRUNNER_[A-Z]+__[A-Z_]+", text):
        resolve(environ={name: "null"} if "JOIN" in name else {}, sections=("worker",))


@pytest.mark.timeout(60)
def test_slurm_script_refuses_to_start_without_an_address(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMRUNNER_")}
    done = subprocess.run(["bash", str(DEPLOY / "slurm-agents.sbatch")], capture_output=True,
                          text=True, timeout=30, env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert "SHMRUNNER_WORKER__CONNECT" in done.stderr, done.stderr
