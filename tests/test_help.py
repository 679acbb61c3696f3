"""``hubfs --help`` and each command's help speak to users: what it is for, one example."""

from __future__ import annotations

from hubfs import cli

from .engine_helpers import run_cli


def test_top_help_is_for_users() -> None:
    out = run_cli("--help", check=True).stdout
    assert cli.__doc__ is not None and cli.__doc__.splitlines()[0] not in out
    assert "thin call" not in out and "traceback" not in out.lower()
    assert "deduplicated store" in out and 'eval "$(hubfs env ~/.cache)"' in out


def test_every_command_says_what_it_is_for_with_an_example() -> None:
    commands = cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"bench", "prune", "mount", "gc"} <= set(commands)
    for name, parser in commands.items():
        out = parser.format_help()  # what `hubfs NAME --help` prints (in-process: 20 commands)
        description = out.split("\n\n")[1]
        assert len(description.split()) >= 8, (name, description)
        example = out.rsplit("example:\n", 1)[1].strip().splitlines()
        assert len(example) == 1 and "hubfs" in example[0] and name in example[0], (name, out)
