import json

from click.testing import CliRunner

from xenlab.cli import main


def run(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_help_lists_commands():
    result = run("--help")
    for cmd in ("doctor", "build", "up", "down", "status", "ssh", "console"):
        assert cmd in result.output


def test_config_json_applies_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[lab]\nvcpus = 1\n[dom0]\nvcpus = 1\n')
    result = run("--config", str(cfg), "config", "--name", "beta", "--json")
    data = json.loads(result.output)
    assert data["name"] == "beta" and data["vcpus"] == 1


def test_bad_config_key_exits_2_with_hint(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[lab]\nmemroy = 1\n")
    result = run("--config", str(cfg), "config")
    assert result.exit_code == 2
    assert "unknown config key [lab] memroy" in result.output and "hint: known keys" in result.output


def test_bad_name_rejected_before_anything(tmp_path):
    result = run("up", "--name", "no spaces", env={"XENLAB_STATE": str(tmp_path)})
    assert result.exit_code == 2 and "invalid lab name" in result.output
    assert not any(tmp_path.iterdir())


def test_bad_accel_is_a_usage_error():
    assert run("up", "--accel", "xen").exit_code == 2


def test_status_of_unknown_lab_is_down(tmp_path):
    result = run("status", "--name", "ghost", "--json", env={"XENLAB_STATE": str(tmp_path)})
    assert json.loads(result.output) == {"name": "ghost", "state": "down", "hint": "nothing runs"}
    assert not (tmp_path / "labs" / "ghost").exists()  # asking made nothing


def test_ssh_to_a_lab_that_is_not_up(tmp_path):
    result = run("ssh", "--name", "ghost", "--", "true", env={"XENLAB_STATE": str(tmp_path)})
    assert result.exit_code == 1 and "lab 'ghost' is not up" in result.output


def test_one_lab_option_for_every_command_with_the_old_spelling_hidden(tmp_path):
    from xenlab.cli import main

    def lab_options(group, path=()):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from lab_options(cmd, path + (name,))
            else:
                yield path + (name,), [p for p in cmd.params if "--lab" in getattr(p, "opts", ())]

    for path, found in lab_options(main):
        if path[-1] in ("doctor", "build") or path[:2] == ("guest", "build") or path[:2] == ("guest", "kernel-dir") or path[0] == "snapshot" or path == ("debug", "core-log"):
            continue  # host-only commands: no lab
        assert len(found) == 1 and found[0].opts == ["--lab", "--name"], path
    help_text = run("guest", "create", "--help").output
    assert "--lab LAB" in help_text and "--name" not in help_text
    env = {"XENLAB_STATE": str(tmp_path)}
    assert json.loads(run("status", "--lab", "ghost", "--json", env=env).output)["name"] == "ghost"
    assert json.loads(run("status", "--name", "ghost", "--json", env=env).output)["name"] == "ghost"


def test_help_and_config_do_not_load_libvirt():
    import subprocess
    import sys

    code = "import sys; from xenlab.cli import main; sys.argv=['xenlab','config','--json']\ntry: main()\nexcept SystemExit: pass\nprint('libvirt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_verify_refuses_a_guest_type_the_lab_cannot_run_before_touching_it(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[lab]\naccel = "tcg"\n[dom0]\nsuite = "trixie"\n')
    state = tmp_path / "state"
    result = run("--config", str(cfg), "verify", "--lab", "never-booted", "--guest-type", "hvm", env={"XENLAB_STATE": str(state)})
    assert result.exit_code == 2, result.output
    assert "HVM guests under TCG need a lab with one vCPU; this lab has 2" in result.output and "xenlab up --vcpus 1" in result.output
    assert not (state / "labs" / "never-booted" / "lab.json").exists() and not list(state.rglob("*.qcow2"))


def test_down_forget_is_refused_for_a_lab_here(tmp_path):
    result = run("down", "--lab", "here", "--forget", env={"XENLAB_STATE": str(tmp_path)})
    assert result.exit_code == 2 and "--forget is for a lab on a remote libvirt host" in result.output, result.output


def test_every_lazily_loaded_command_is_the_one_its_name_says():
    """The CLI imports a command's module only when it runs, so its table
    names each command apart from the command itself: they must agree."""
    import click

    from xenlab.cli import ALIASES, COMMANDS

    ctx = click.Context(main)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name, name
    for alias, name in ALIASES.items():
        assert main.get_command(ctx, alias).name == name and alias not in main.list_commands(ctx)
    assert main.get_command(ctx, "nosuch") is None
