"""Server-side pieces without a network: host parsing, argv building (no shell strings), error classification."""

import shlex

import pytest

from deploy.deployer import sh_c, validate_python, validate_remote_dir
from deploy.ssh import SshOptions, classify, parse_hosts
from redistill.errors import UserError


def test_parse_hosts():
    hs = parse_hosts("nvidia@10.0.0.5:2222, tx2-lab ,orin@[fe80::1]:22")
    assert [(h.user, h.host, h.port) for h in hs] == [("nvidia", "10.0.0.5", 2222), (None, "tx2-lab", None),
                                                      ("orin", "[fe80::1]", 22)]
    assert hs[0].destination == "nvidia@10.0.0.5" and hs[0].label == "nvidia@10.0.0.5_2222"
    for bad in ("-oProxyCommand=x", "a b", "host;rm", "u@h:99999", "", "a,a"):
        with pytest.raises(UserError):
            parse_hosts(bad)


def test_ssh_argv_keeps_checking_on_and_never_prompts():
    h = parse_hosts("nvidia@jetson:2200")[0]
    argv = SshOptions(config="/tmp/cfg", options=["ProxyJump=gw"]).ssh(h, "true")
    assert argv[0] == "ssh" and argv[-2:] == ["nvidia@jetson", "true"]
    assert "BatchMode=yes" in argv and ["-p", "2200"] == argv[argv.index("-p"):argv.index("-p") + 2]
    assert not any("StrictHostKeyChecking" in a for a in argv)
    with pytest.raises(UserError):
        SshOptions(options=["-oProxyCommand=evil"]).ssh(h, "true")
    rs = SshOptions(config="/tmp/my cfg").rsync(h, ["/a"], "base/x")
    rsh = rs[rs.index("-e") + 1]
    assert shlex.split(rsh)[:1] == ["ssh"] and "/tmp/my cfg" in shlex.split(rsh)
    assert rs[-1] == "nvidia@jetson:base/x/"
    assert SshOptions().scp(h, ["/a"], "d")[3:] == ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o",
                                                    "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
                                                    "-P", "2200", "/a", "nvidia@jetson:d/"]


def test_remote_inputs_are_validated_and_quoted():
    assert validate_remote_dir("/data/redistill/") == "/data/redistill"
    for bad in ("../x", "a/../b", "$(reboot)", "a;b", "~/x", "-rf"):
        with pytest.raises(UserError):
            validate_remote_dir(bad)
    for bad in ("python3; reboot", "-c", "", "py thon"):
        with pytest.raises(UserError):
            validate_python(bad)
    assert shlex.split(sh_c("echo 'a b'; ls")) == ["sh", "-c", "echo 'a b'; ls"]


@pytest.mark.parametrize("stderr,needle", [
    ("ssh: connect to host 10.0.0.9 port 22: Connection refused", "cannot reach"),
    ("ssh: connect to host 10.0.0.9 port 22: Connection timed out", "connection timed out"),
    ("ssh: Could not resolve hostname tx3: Name or service not known", "unknown host name"),
    ("nvidia@10.0.0.9: Permission denied (publickey,password).", "ssh-copy-id"),
    ("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.", "ssh-keygen -R"),
    ("No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\n"
     "Host key verification failed.", "not in known_hosts"),
    ("rsync: write failed on \"x\": No space left on device (28)", "out of disk space"),
])
def test_classify(stderr, needle):
    h = parse_hosts("nvidia@10.0.0.9")[0]
    msg = classify(stderr, h, "copying")
    assert needle in msg and "\n" not in msg
    assert classify("something else", h, "copying") is None
