"""Tiny command dispatcher for the agent modules (stdlib only, no argparse
boilerplate per module): `python3 -m xenlab_agent.MOD COMMAND [ARG ...] --key value ...`.

Arguments and options come from the command function's signature: its
parameters without a default are the arguments, in order (or given as
options), the others options; the result is printed as one JSON document on stdout. An AgentError is reported as
errors.report does (one prefixed JSON line on stderr, exit code 3)."""

from __future__ import annotations

import inspect
import json
import sys

from .errors import AgentError, report


def _convert(param: inspect.Parameter, raw: str):
    kind = type(param.default) if param.default is not inspect.Parameter.empty else param.annotation
    if kind in (int, "int"):
        return int(raw, 0)
    if kind in (float, "float"):
        return float(raw)
    return raw


def parse(func, args: list[str]) -> dict:
    sig = inspect.signature(func)
    params = {name.replace("_", "-"): p for name, p in sig.parameters.items()}
    kwargs: dict = {}
    positional = [p for p in sig.parameters.values() if p.default is inspect.Parameter.empty]
    it = iter(args)
    for arg in it:
        if not arg.startswith("--") and positional:
            param = positional.pop(0)
            try:
                kwargs[param.name] = _convert(param, arg)
            except ValueError:
                raise AgentError(f"bad value for {param.name.upper()}: {arg!r}") from None
            continue
        if not arg.startswith("--") or arg[2:].split("=")[0] not in params:
            raise AgentError(f"unknown option {arg!r}", "options: " + " ".join(f"--{n}" for n in params))
        key, eq, value = arg[2:].partition("=")
        param = params[key]
        if isinstance(param.default, bool):
            kwargs[param.name] = True
            continue
        if not eq:
            following = next(it, None)
            if following is None:
                raise AgentError(f"option --{key} needs a value")
            value = following
        try:
            kwargs[param.name] = _convert(param, value)
        except ValueError:
            raise AgentError(f"bad value for --{key}: {value!r}") from None
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise AgentError("missing option(s): " + ", ".join(f"--{n}" for n in missing))
    return kwargs


def run_main(commands: dict, argv: list[str] | None, doc: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] not in commands:
            raise AgentError(f"unknown command {argv[0] if argv else ''!r}", "commands: " + ", ".join(commands))
        func = commands[argv[0]]
        result = func(**parse(func, argv[1:]))
    except AgentError as e:
        return report(e)
    except KeyboardInterrupt:
        return 130
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0
