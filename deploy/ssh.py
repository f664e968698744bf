"""The system OpenSSH client, rsync and scp as argv lists, and their failures turned into one-line errors.

Using the system tools means ``~/.ssh/config``, the agent, jump hosts and ``known_hosts``
apply as they do for the user's own ``ssh``. BatchMode is always on (nothing prompts);
host key checking is left at the user's setting (on by default).
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from redistill.errors import UserError

# user@host, host, alias, [v6]; no leading '-' so it can never be read as an option
_HOST_RE = re.compile(r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]*)"
                      r"(?::(?P<port>\d{1,5}))?$")


@dataclass(frozen=True)
class Host:
    """One ``user@host[:port]`` or ssh config alias."""

    spec: str
    user: Optional[str]
    host: str
    port: Optional[int]

    @property
    def destination(self) -> str:
        """What ssh/rsync get as the destination (the port goes in ``-p``)."""
        host = self.host.strip("[]")
        return f"{self.user}@{host}" if self.user else host

    @property
    def label(self) -> str:
        """A file-name-safe name for reports/<label>/."""
        return re.sub(r"[^A-Za-z0-9._@-]+", "_", self.spec)


def parse_hosts(text: str) -> List[Host]:
    """Parse ``user@host[:port]`` / alias, comma-separated for a fleet."""
    hosts = []
    for spec in (s.strip() for s in (text or "").split(",")):
        if not spec:
            continue
        m = _HOST_RE.match(spec)
        if not m or (m.group("port") and not 0 < int(m.group("port")) < 65536):
            raise UserError(f"bad host {spec!r}: write user@host, user@host:port or an ssh config alias "
                            "(comma-separated for several devices)")
        hosts.append(Host(spec, m.group("user"), m.group("host"), int(m.group("port")) if m.group("port") else None))
    if not hosts:
        raise UserError("no host given: pass --host user@host[:port] (or JETSON=... to make)")
    if len({h.spec for h in hosts}) != len(hosts):
        raise UserError(f"host list {text!r} names a device twice; list each once")
    return hosts


@dataclass
class SshOptions:
    """Client settings shared by ssh, rsync and scp."""

    config: Optional[str] = None          # -F FILE
    identity: Optional[str] = None        # -i FILE
    options: Sequence[str] = field(default_factory=list)  # extra -o KEY=VALUE from the user
    connect_timeout: int = 10

    def common(self, host: Host, port_flag: str = "-p") -> List[str]:
        argv = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if self.config:
            argv += ["-F", self.config]
        if self.identity:
            argv += ["-i", self.identity]
        for opt in self.options:
            if not re.match(r"^[A-Za-z][A-Za-z0-9]*=.+$", opt):
                raise UserError(f"bad ssh option {opt!r}: write KEY=VALUE, e.g. --ssh-option ProxyJump=gateway")
            argv += ["-o", opt]
        if host.port:
            argv += [port_flag, str(host.port)]
        return argv

    def ssh(self, host: Host, remote_command: str) -> List[str]:
        return ["ssh", *self.common(host), host.destination, remote_command]

    def rsync(self, host: Host, sources: Sequence[str], remote_dir: str, checksum: bool = False,
              delete: bool = False) -> List[str]:
        """``delete``: remove files the sources no longer have from the copied folders (not from ``remote_dir``)."""
        # rsync splits -e itself and understands single quotes, which is what shlex.quote emits
        rsh = " ".join(shlex.quote(a) for a in ["ssh", *self.common(host)])
        argv = ["rsync", "-rtL", "--chmod=u+rwX", "--exclude=__pycache__", "--exclude=*.pyc", "--out-format=%n", "-e", rsh]
        if checksum:
            argv.append("--checksum")
        if delete:
            argv.append("--delete")
        return [*argv, *sources, f"{host.destination}:{remote_dir}/"]

    def scp(self, host: Host, sources: Sequence[str], remote_dir: str) -> List[str]:
        return ["scp", "-r", "-p", *self.common(host, port_flag="-P"), *sources, f"{host.destination}:{remote_dir}/"]


def require_client(tool: str) -> None:
    if shutil.which(tool) is None:
        raise UserError(f"{tool} is not installed on this machine: sudo apt install "
                        f"{'openssh-client' if tool in ('ssh', 'scp') else tool}")


def classify(stderr: str, host: Host, what: str) -> Optional[str]:
    """Map ssh/rsync/scp stderr to one line naming the fix, or None when it is not an ssh-level failure."""
    s = stderr
    hp = f"ssh{' -p ' + str(host.port) if host.port else ''} {host.destination}"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in s or "Host key for" in s and "has changed" in s:
        return (f"the host key of {host.spec} has changed (a reflashed device, or someone in the middle): if you expect "
                f"it, remove the old key with `ssh-keygen -R {host.host}` (or the [host]:port entry) and connect once "
                f"with `{hp}` to check the new fingerprint")
    if "Host key verification failed" in s or "No ED25519 host key is known" in s or "host key is known for" in s:
        return (f"the host key of {host.spec} is not in known_hosts and host key checking is on: connect once with "
                f"`{hp}` to verify and accept it")
    if "Permission denied" in s and ("publickey" in s or "password" in s or "keyboard-interactive" in s):
        return (f"{host.spec} refused authentication: install your public key with `ssh-copy-id "
                f"{'-p ' + str(host.port) + ' ' if host.port else ''}{host.destination}` (passwords are not asked: "
                f"BatchMode is on) or point --identity / ~/.ssh/config at the right key")
    for pattern, why in (("Connection refused", "connection refused"), ("Connection timed out", "connection timed out"),
                         ("Operation timed out", "connection timed out"), ("No route to host", "no route to host"),
                         ("Network is unreachable", "network unreachable"),
                         ("Could not resolve hostname", "unknown host name"),
                         ("Name or service not known", "unknown host name"),
                         ("Connection closed by", "connection closed during the handshake"),
                         ("Connection reset by", "connection reset")):
        if pattern in s:
            return (f"cannot reach {host.spec} ({why}): check the address and port, that the device is on and sshd "
                    f"runs there, and try `{hp}` by hand")
    if "No space left on device" in s or "Disk quota exceeded" in s:
        return (f"the device {host.spec} ran out of disk space while {what}: free space there (`df -h`, old "
                f"engines under the remote dir) or pass --remote-dir on a larger disk")
    return None
