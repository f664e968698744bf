"""The agent's measurement options are one table (deploy/agent/contract.py): the agent, `redistill deploy` and the
loopback bench all take every option with the table's default, and the values reach the agent unchanged."""

import argparse

import pytest

from bench import loopback_bench
from deploy import cli as deploy_cli
from deploy.agent import cli as agent_cli
from deploy.agent.backends import backend_choices
from deploy.agent.contract import EXIT_REFUSED, MEASURE_OPTIONS, measure_argv
from redistill.errors import UserError


def deploy_parser():
    sub = argparse.ArgumentParser().add_subparsers()
    deploy_cli.add_commands(sub)
    return sub.choices["deploy"]


PARSERS = {"agent": (agent_cli.build_parser, {}, {}),
           "deploy": (deploy_parser, {}, {}),
           "loopback-bench": (loopback_bench.build_parser, loopback_bench.DEFAULTS, loopback_bench.FIXED)}


@pytest.mark.parametrize("which", sorted(PARSERS))
def test_every_contract_option_is_in_the_parser_with_its_default(which):
    build, overrides, fixed = PARSERS[which]
    actions = build()._option_string_actions
    for o in MEASURE_OPTIONS:
        if o.dest in fixed:
            assert o.flag not in actions, f"{which} fixes {o.flag}"
            continue
        a = actions[o.flag]
        assert a.dest == o.dest and a.type is o.type, (which, o.flag)
        assert a.default == overrides.get(o.dest, o.default), (which, o.flag)
        expected = backend_choices() if o.dest == "backend" else o.choices
        assert (tuple(a.choices) if a.choices else None) == expected, (which, o.flag)
    own = {a.dest for a in build()._actions} & {o.dest for o in MEASURE_OPTIONS}
    assert own == {o.dest for o in MEASURE_OPTIONS} - set(fixed)


def test_fixed_and_overridden_defaults_of_the_loopback_bench():
    args = loopback_bench.build_parser().parse_args(["b"])
    assert args.backend == "onnxruntime" and args.threads == 1
    argv = measure_argv(args)
    assert argv[argv.index("--backend") + 1] == "onnxruntime" and argv[argv.index("--threads") + 1] == "1"


def test_deploy_values_reach_the_agent_unchanged():
    given = ["--backend", "onnxruntime", "--precision", "fp16", "--batch", "3", "--warmup", "0", "--iters", "7",
             "--mem-iters", "4", "--sample-ms", "50", "--threads", "2", "--ort-device", "cpu", "--workspace-mb", "64",
             "--min-top1", "0.75", "--slope-batches", "2,8,32"]
    assert len(given) == 2 * len(MEASURE_OPTIONS)
    d = deploy_parser().parse_args(["bundle", "--host", "h", *given])
    a = agent_cli.parse_args(["--bundle", "bundle", *measure_argv(d)])
    for o in MEASURE_OPTIONS:
        assert getattr(a, o.dest) == getattr(d, o.dest) == o.type(given[given.index(o.flag) + 1]), o.flag


def test_every_parser_refuses_a_value_below_the_minimum(capsys):
    with pytest.raises(SystemExit) as e:
        agent_cli.parse_args(["--bundle", "b", "--mem-iters", "0"])
    assert e.value.code == EXIT_REFUSED and "--mem-iters must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        loopback_bench.main(["b", "--warmup", "-1"])
    assert e.value.code == 2 and "--warmup must be at least 0" in capsys.readouterr().err
    with pytest.raises(UserError, match="--batch must be at least 1"):
        deploy_cli.run(deploy_parser().parse_args(["bundle", "--host", "h", "--batch", "0"]))
