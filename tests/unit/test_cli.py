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
