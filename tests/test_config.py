from pathlib import Path

import pytest

from aifactory_core.config import load_config, parse_config
from aifactory_core.errors import ConfigError


def test_missing_default_file_gives_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AIFACTORY_CONFIG", raising=False)
    monkeypatch.setattr("aifactory_core.config.DEFAULT_PATH", str(tmp_path / "absent.conf"))
    config = load_config(None)
    assert config.path is None and config.plugins.enabled is None


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "absent.conf"))


def test_full_config(tmp_path: Path) -> None:
    path = tmp_path / "aifactory.conf"
    path.write_text(
        '[plugins]\nenabled = ["vfio", "numa"]\norder = ["numa"]\n'
        '[host]\nreserved_cpus = "0-1,112-113"\nhost_devices = ["0000:c1:00.0", "17:00.0"]\n'
        '[plugin.vfio]\nbind_timeout_s = 10\n'
    )
    config = load_config(str(path))
    assert config.plugins.enabled == ("vfio", "numa")
    assert config.host.reserved_cpus == {0, 1, 112, 113}
    assert config.host.host_devices == ("0000:c1:00.0", "0000:17:00.0")
    assert config.plugin("vfio") == {"bind_timeout_s": 10}
    assert config.plugin("absent") == {}


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"bogus": 1}, "bogus"),
        ({"plugins": {"enabled": "vfio"}}, "plugins.enabled"),
        ({"plugins": {"enable": ["vfio"]}}, "plugins.enable"),
        ({"host": {"reserved_cpus": "0-x"}}, "host.reserved_cpus"),
        ({"host": {"reserved_cpus": 3}}, "host.reserved_cpus"),
        ({"host": {"host_devices": ["../00:1f.0"]}}, "host.host_devices"),
        ({"host": {"state_dir": "relative"}}, "host.state_dir"),
        ({"host": {"state_dir": "/var/lib/one/aifactory"}}, "host.state_dir' is not supported"),
        ({"plugin": {"vfio": 3}}, "plugin"),
    ],
)
def test_invalid_values_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert key in str(caught.value)


def test_toml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.conf"
    path.write_text("[host\nreserved_cpus=1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert "\n" not in str(caught.value) and "line 1" in str(caught.value)
