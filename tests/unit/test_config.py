import pytest

from xenlab import config
from xenlab.errors import ConfigError


def test_defaults_resolve():
    cfg = config.load()
    assert cfg.name == "default"
    assert cfg.memory == 2048 and cfg.dom0.memory == 1024
    assert cfg.accel == "auto" and cfg.cpu == "svm"


def test_toml_and_overrides_layer(tmp_path):
    f = tmp_path / "lab.toml"
    f.write_text('[lab]\nname = "alpha"\nmemory = "3G"\n[dom0]\nmemory = 768\n')
    cfg = config.load(f, {"vcpus": 1, "dom0.vcpus": 1, "accel": None})
    assert (cfg.name, cfg.memory, cfg.dom0.memory, cfg.vcpus, cfg.dom0.vcpus) == ("alpha", 3072, 768, 1, 1)
    assert cfg.accel == "auto"  # None means "not given on the command line"


@pytest.mark.parametrize(
    "toml, fragment",
    [
        ("[lab]\nmemroy = 1\n", "unknown config key [lab] memroy"),
        ("[labs]\nname = 'x'\n", "unknown config section [labs]"),
        ("[lab]\naccel = 'xen'\n", "accel must be one of"),
        ("[lab]\nname = 'a b'\n", "invalid lab name 'a b'"),
        ("[lab]\nmemory = 'lots'\n", "cannot read 'lots' as a size"),
        ("[dom0]\nmemory = '4G'\n", "does not fit in lab memory"),
        ("[lab]\nvcpus = 'two'\n", "must be an integer"),
        ("[lab]\nconnect = 'not a uri'\n", "bad libvirt URI"),
        ("[lab]\nssh_port = 70000\n", "ssh_port must be 0..65535"),
        ("[lab\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, toml, fragment):
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as err:
        config.load(f)
    assert fragment in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml")


@pytest.mark.parametrize("text, mib", [("2G", 2048), ("512M", 512), ("512", 512), (640, 640), ("1GiB", 1024)])
def test_parse_mib(text, mib):
    assert config.parse_mib(text, "k") == mib


@pytest.mark.parametrize("name", ["", "A", "has space", "semi;colon", "x" * 33, "-lead", "../up"])
def test_bad_names(name):
    with pytest.raises(ConfigError):
        config.validate_name(name)


def test_json_round_trip():
    import json

    data = json.loads(config.load().to_json())
    assert data["dom0"]["suite"] == "bookworm"


def test_differences_name_what_a_running_lab_was_not_started_with():
    running = config.load(overrides={"name": "d"})
    assert running.differences(running) == []
    # How it boots is not what runs: no difference.
    assert config.load(overrides={"name": "d", "boot_timeout": 999, "snapshots": False}).differences(running) == []
    asked = config.load(overrides={"name": "d", "memory": "3G", "dom0.vcpus": 1})
    assert asked.differences(running) == [f"memory: {running.memory!r} -> 3072", f"dom0.vcpus: {running.dom0.vcpus!r} -> 1"]
