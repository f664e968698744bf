"""``redistill deploy BUNDLE --host user@host[:port][,...]``: measure a bundle on Jetson devices over ssh."""

from __future__ import annotations

import argparse
import os
import sys

from deploy.agent.backends import backend_choices
from deploy.agent.contract import add_measure_options, measure_argv, measure_option_error


def add_commands(sub) -> None:
    p = sub.add_parser("deploy", help="copy a bundle to devices over ssh, measure it there, save the reports",
                       description="Copy BUNDLE and the bench agent to each device (system ssh + rsync/scp, so "
                       "~/.ssh/config, agent, jump hosts and known_hosts apply), run the agent, save "
                       "reports/<host>/<bundle>/<timestamp>.json.")
    p.add_argument("bundle", help="bundle folder written by `redistill export`")
    p.add_argument("--host", required=True, help="user@host[:port] or ssh config alias; comma-separated for several")
    p.add_argument("--python", default=os.environ.get("JETSON_PYTHON") or "python3",
                   help="interpreter on the device (default $JETSON_PYTHON or python3)")
    add_measure_options(p, choices={"backend": backend_choices()})  # the agent's options, passed through to it
    p.add_argument("--remote-dir", default=".cache/redistill/deploy", help="base folder on the device (relative = under home)")
    p.add_argument("--reports", default="reports", help="local folder for reports")
    p.add_argument("--copy", default="auto", choices=["auto", "rsync", "scp"], help="auto = rsync when both ends have it")
    p.add_argument("--recopy", action="store_true", help="compare file contents, not size+mtime (repairs altered files)")
    p.add_argument("--ssh-config", help="ssh client config file (ssh -F)")
    p.add_argument("--identity", help="private key file (ssh -i)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra ssh -o option, repeatable (e.g. ProxyJump=gw)")
    p.add_argument("--connect-timeout", type=int, default=10, help="seconds")
    p.add_argument("--copy-timeout", type=int, default=600, help="seconds")
    p.add_argument("--run-timeout", type=int, default=1800, help="seconds for the agent (TensorRT builds take minutes)")
    p.add_argument("--quiet", action="store_true", help="do not stream the agent's progress")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deploy.deployer import Deployer, DeployOptions
    from deploy.ssh import SshOptions, parse_hosts
    from redistill.errors import UserError

    error = measure_option_error(args)
    if error:
        raise UserError(error)
    for name in ("connect_timeout", "copy_timeout", "run_timeout"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    hosts = parse_hosts(args.host)
    agent_args = measure_argv(args)
    ssh = SshOptions(config=args.ssh_config, identity=args.identity, options=args.ssh_option,
                     connect_timeout=args.connect_timeout)
    opts = DeployOptions(python=args.python, remote_dir=args.remote_dir, reports=args.reports, copy=args.copy,
                         recopy=args.recopy, connect_timeout=args.connect_timeout, copy_timeout=args.copy_timeout,
                         run_timeout=args.run_timeout, agent_args=agent_args, ssh=ssh, quiet=args.quiet)
    results = Deployer(args.bundle, opts).run(hosts)
    failed = [r for r in results if r.error]
    if len(hosts) == 1 and failed:
        raise UserError(failed[0].error)
    rc = 0
    for r in results:
        if r.error:
            print(f"redistill deploy: error: {r.error}", file=sys.stderr)
            rc = 2
        else:
            check = r.report.get("output_check") or {}
            print(f"{r.host.spec}: {r.report_path}")
            if not check.get("passed"):
                print(f"redistill deploy: {r.host.spec}: output check FAILED (max abs diff {check.get('max_abs_diff')}, "
                      f"top-1 agreement {check.get('top1_agreement')}); report kept at {r.report_path}", file=sys.stderr)
                rc = max(rc, 1)
    return rc
