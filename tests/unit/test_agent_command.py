"""`ferry agent --config FILE --check`, and `python -m services.agent`, as processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services import certificates
from services.config import HostConfig
from services.credentials import BusCredentials, write_credentials

EXAMPLE = Path(__file__).parents[2] / "deploy" / "systemd" / "agent.toml.example"
FERRY = Path(sys.executable).parent / "ferry"  # the venv's entry point


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    return subprocess.run(
        args, capture_output=True, text=True, env=clean | env, timeout=60, check=False
    )


def host_files(tmp_path: Path) -> tuple[Path, Path]:
    """The example config, pointing at a real credentials file (0600) and real TLS files
    (`ferry certs`'s) in tmp_path."""
    creds = tmp_path / "h1.creds"
    write_credentials(creds, BusCredentials(user="h1", password="correct-horse-battery"))
    certificates.issue(certificates.ensure_ca(tmp_path), tmp_path, "h1", ["10.0.0.11"])
    config = tmp_path / "agent.toml"
    text = EXAMPLE.read_text().replace("/etc/ferry/h1.creds", str(creds))
    config.write_text(text.replace("/etc/ferry/", f"{tmp_path}/"))
    return config, creds


def test_check_prints_the_effective_config_as_json(tmp_path: Path) -> None:
    config, creds = host_files(tmp_path)
    done = run(str(FERRY), "agent", "--config", str(config), "--check", FERRY_BRIDGE="br7")
    assert (done.returncode, done.stderr) == (0, "")
    shown = json.loads(done.stdout)
    assert shown["config_file"] == str(config)
    assert shown["network"]["bridge"] == "br7"  # the variable beats the file
    assert shown["bus"]["servers"][0] == "nats://10.9.0.1:4222"
    assert shown["capacity"] == {"memory_mib": 16384, "cpus": 8.0}
    assert shown == HostConfig.load(config).as_file() | {"network": shown["network"]}
    assert shown["bus"]["creds"] == str(creds)  # where the secret is, never what it says
    assert "correct-horse-battery" not in done.stdout + done.stderr


def test_check_refuses_credentials_the_agent_could_not_use(tmp_path: Path) -> None:
    config, creds = host_files(tmp_path)
    creds.chmod(0o644)
    done = run(str(FERRY), "agent", "--config", str(config), "--check")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"ferry agent: {config}: bus.creds: credentials {creds} are")
    assert "correct-horse-battery" not in done.stderr
    creds.unlink()
    done = run(str(FERRY), "agent", "--config", str(config), "--check")
    assert done.returncode == 2 and "cannot read credentials" in done.stderr


def test_check_refuses_a_bad_file_with_exit_2_naming_the_file_and_the_key(
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(EXAMPLE.read_text().replace('ip_pool = "100-250"', 'ip_pool = "0-300"'))
    done = run(str(FERRY), "agent", "--config", str(config), "--check")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"ferry agent: {config}: network.ip_pool: ")
    assert len(done.stderr.splitlines()) == 1
    missing = tmp_path / "none.toml"
    done = run(str(FERRY), "agent", "--config", str(missing), "--check")
    assert (done.returncode, done.stdout) == (2, "")
    assert f"{missing}: cannot read" in done.stderr


def test_the_module_the_lab_starts_still_runs_and_says_what_is_missing() -> None:
    done = run(sys.executable, "-m", "services.agent", FERRY_HOST="h1")
    assert done.returncode == 2
    assert "FERRY_HOST_ADDRESS" in done.stderr and "FERRY_NATS_URL" in done.stderr
