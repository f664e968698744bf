"""A throwaway OpenSSH server on 127.0.0.1 standing in for a Jetson: the deploy tests and the loopback bench use it.

Everything lives in one temp folder: host and client keys generated for it, an ``sshd_config``
with its own HostKey/AuthorizedKeysFile/PidFile, and a client config + known_hosts to pass with
``ssh -F``. It never reads or writes ``~/.ssh`` or the system sshd's files.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional

from deploy.agent.contract import LOCK_ENV

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "redistill-loopback", "-f", str(path)],
                   check=True, stdout=subprocess.DEVNULL)
    return path


def sshd_available() -> Optional[str]:
    """None when a loopback sshd can run here, else why not."""
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt install openssh-client)"
    if not os.path.exists(SSHD):
        return "sshd is not installed (apt install openssh-server)"
    return None


class LoopbackSshd:
    """``with LoopbackSshd(dir, n=2) as s:`` -> ``s.aliases`` are ssh config aliases for ``s.config``."""

    def __init__(self, workdir: Path, n: int = 1, user: Optional[str] = None):
        self.dir = Path(workdir)
        self.n = n
        self.user = user or getpass.getuser()
        self.ports: List[int] = []
        self.procs: List[subprocess.Popen] = []
        self.aliases = [f"loop{i}" for i in range(n)]

    def __enter__(self) -> "LoopbackSshd":
        why = sshd_available()
        if why:
            raise RuntimeError(why)
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self.host_key = keygen(self.dir / "host_key")
        self.other_host_key = keygen(self.dir / "other_host_key")
        self.client_key = keygen(self.dir / "client_key")
        self.stranger_key = keygen(self.dir / "stranger_key")  # never authorized
        (self.dir / "authorized_keys").write_text((self.dir / "client_key.pub").read_text())
        try:
            for i in range(self.n):
                self._start(i)
        except BaseException:
            self.__exit__()
            raise
        self.known_hosts = self.write_known_hosts(self.dir / "known_hosts", self.host_key)
        self.config = self.write_client_config(self.dir / "ssh_config")
        return self

    def _start(self, i: int) -> None:
        for attempt in range(5):
            port = free_port()
            cfg = self.dir / f"sshd_config.{i}"
            cfg.write_text("\n".join([
                f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
                f"AuthorizedKeysFile {self.dir / 'authorized_keys'}", "StrictModes no", "UsePAM no",
                f"PidFile {self.dir / f'sshd.{i}.pid'}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", f"AllowUsers {self.user}",
                "Subsystem sftp internal-sftp", "LogLevel ERROR", "MaxStartups 50",
                # each server is a device of its own: its own measurement lock, not this machine's /tmp one
                f"SetEnv {LOCK_ENV}={self.dir / f'agent.{i}.lock'}", ""]))
            log = open(self.dir / f"sshd.{i}.log", "ab")
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            log.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    self.ports.append(port)
                    self.procs.append(proc)
                    return
                except OSError:
                    time.sleep(0.05)
            proc.kill()
            proc.wait()
        raise RuntimeError(f"sshd did not start; see {self.dir / f'sshd.{i}.log'}")

    def write_known_hosts(self, path: Path, key: Path) -> Path:
        pub = " ".join(Path(f"{key}.pub").read_text().split()[:2])
        path.write_text("".join(f"[127.0.0.1]:{p} {pub}\n" for p in self.ports))
        return path

    def write_client_config(self, path: Path, identity: Optional[Path] = None, known_hosts: Optional[Path] = None) -> Path:
        """An ``ssh -F`` file with one alias per server; swap the identity or known_hosts for failure tests."""
        blocks = [f"Host {a}\n  HostName 127.0.0.1\n  Port {p}\n  User {self.user}\n" for a, p in zip(self.aliases, self.ports)]
        blocks.append("Host *\n"
                      f"  IdentityFile {identity or self.client_key}\n  IdentitiesOnly yes\n"
                      f"  UserKnownHostsFile {known_hosts or self.known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
                      "  StrictHostKeyChecking yes\n  CheckHostIP no\n")
        path.write_text("\n".join(blocks))
        return path

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []
