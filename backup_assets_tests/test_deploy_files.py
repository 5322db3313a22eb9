"""The deployment files agree with each other and with the package (cheap; the real run is test_containers)."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import yaml

from backup_assets.catalog import load_catalog

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def env_example(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_compose_env_file_and_launcher_agree():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    example = env_example(DOCKER / ".env.example")
    text = (DOCKER / "compose.yaml").read_text()
    # every variable the compose file interpolates is in the example env file
    used = set(re.findall(r"\$\{([A-Z_]+)", text)) - {"BACKUP_ASSETS_ENV_FILE", "BASE_IMAGE", "CATALOG"}
    assert used <= set(example), used - set(example)
    services = compose["services"]
    assert set(services) == {"dagster-postgres", "code", "webserver", "daemon"}
    assert all(s.get("init") for s in services.values())
    assert services["webserver"]["ports"] == ["127.0.0.1:${DAGSTER_WEBSERVER_PORT:-3000}:3000"]
    # the launcher's network and volume are the compose file's, by their fixed names
    instance = yaml.safe_load((DOCKER / "dagster.yaml").read_text())
    launcher = instance["run_launcher"]
    assert launcher["class"] == "DockerRunLauncher"
    assert launcher["config"]["network"] == compose["networks"]["backup_assets"]["name"]
    volume = launcher["config"]["container_kwargs"]["volumes"][0].split(":")[0]
    assert compose["volumes"][volume]["name"] == volume
    # every secret the baked catalog names reaches the run containers, and so does every ${VAR} it reads
    catalog_text = (DOCKER / "catalog.yaml").read_text()
    named = set(re.findall(r"_env: *([A-Z_]+)", catalog_text)) | set(re.findall(r"\$\{([A-Z_]+)", catalog_text))
    assert named <= set(launcher["config"]["env_vars"]), named - set(launcher["config"]["env_vars"])
    # and every variable passed on is in the env file (the launcher refuses a run when one is unset)
    assert set(launcher["config"]["env_vars"]) <= set(example), set(launcher["config"]["env_vars"]) - set(example)
    catalog = load_catalog(DOCKER / "catalog.yaml", env=example)
    assert catalog.repository_root == Path("/backups")


def test_the_instance_files_are_valid_dagster_config(tmp_path):
    from dagster._core.instance.config import dagster_instance_config

    for source in (DOCKER / "dagster.yaml", ROOT / "dagster.yaml"):
        home = tmp_path / source.parent.name
        home.mkdir()
        (home / "dagster.yaml").write_text(source.read_text())
        config, _ = dagster_instance_config(str(home))
        assert config["run_launcher"]["class"] in ("DockerRunLauncher", "LocalRunLauncher")


def test_systemd_units_run_what_the_package_installs():
    bin_dir = Path(sys.executable).parent
    for unit in sorted((DOCKER / "systemd").glob("*.service")):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read(unit)
        command = parser["Service"]["ExecStart"].split()
        program = bin_dir / Path(command[0]).name
        assert program.exists(), f"{unit.name}: {command[0]} is not installed by the package"
        # the arguments parse (the command's own --help with them would start it; check the options exist)
        helptext = subprocess.run([str(program), *command[1:2], "--help"] if "daemon" in program.name
                                  else [str(program), "--help"], capture_output=True, text=True, timeout=120).stdout
        for option in [a for a in command[1:] if a.startswith("-")]:
            assert option in helptext, f"{unit.name}: {option} is not an option of {program.name}"
        assert parser["Service"]["User"] == "backup-assets" and parser["Service"]["EnvironmentFile"]
    workspace = yaml.safe_load((DOCKER / "systemd" / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["python_module"]["module_name"] == "backup_assets.definitions"


def test_helm_values_use_the_image_and_the_k8s_launcher():
    values = yaml.safe_load((DOCKER / "helm" / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "backup_assets.definitions"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    # runs see the same secrets and repository as the code server
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert launcher["envSecrets"] == deployment["envSecrets"]
    assert launcher["volumeMounts"] == deployment["volumeMounts"]
