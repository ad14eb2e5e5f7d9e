"""CRIU's TLS options, on its command lines and in the file runc hands it: the connecting
side checks the peer against the address it dials; only the listening side skips the name
check (its firewall rule admits the one peer)."""

from __future__ import annotations

from pathlib import Path

from services.runtime import bundle, cmdlines
from services.tls import TlsFiles

TLS = TlsFiles(
    ca=Path("/etc/ferry/ca.pem"), cert=Path("/etc/ferry/h1.pem"), key=Path("/etc/ferry/h1.key")
)
FILES = ["--tls-cacert", "/etc/ferry/ca.pem", "--tls-cert", "/etc/ferry/h1.pem",
         "--tls-key", "/etc/ferry/h1.key"]  # fmt: skip


def _after(argv: list[str], flag: str) -> list[str]:
    return argv[argv.index(flag) : argv.index(flag) + 1 + len(FILES)]


def test_a_page_server_listens_over_tls_checking_the_ca_only() -> None:
    argv = cmdlines.criu_page_server(Path("/img"), "10.9.0.12", 4000, tls=TLS)
    assert _after(argv, "--tls") == ["--tls", *FILES]
    assert "--tls-no-cn-verify" in argv


def test_the_lazy_pages_daemon_connects_checking_the_sources_address() -> None:
    argv = cmdlines.criu_lazy_pages(Path("/img"), "10.9.0.11", 4000, tls=TLS)
    assert _after(argv, "--tls") == ["--tls", *FILES]
    assert "--tls-no-cn-verify" not in argv


def test_without_tls_files_nothing_is_added() -> None:
    assert "--tls" not in cmdlines.criu_page_server(Path("/img"), "10.9.0.12", 4000)
    assert "--tls" not in cmdlines.criu_lazy_pages(Path("/img"), "10.9.0.11", 4000)


def test_runcs_dumps_read_tls_from_the_criu_config_file(tmp_path: Path) -> None:
    connecting = bundle.ensure_criu_config(tmp_path / "a.conf", tls=TLS).read_text().splitlines()
    said = [line for line in connecting if line.startswith("tls")]
    assert said == ["tls", "tls-cacert /etc/ferry/ca.pem", "tls-cert /etc/ferry/h1.pem",
                    "tls-key /etc/ferry/h1.key"]  # fmt: skip
    listening = bundle.ensure_criu_config(tmp_path / "b.conf", leave_stopped=True, tls=TLS)
    lines = listening.read_text().splitlines()
    assert "leave-stopped" in lines and "tls-no-cn-verify" in lines  # post-copy's dump listens
    plain = bundle.ensure_criu_config(tmp_path / "c.conf").read_text()
    assert "tls" not in plain
