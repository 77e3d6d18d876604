"""The network_interface setting: the fabrics' variables and the check on each host (no sockets)."""

import pytest

from sparkmpi.config import load_settings
from sparkmpi.errors import ConfigError
from sparkmpi.launch.interfaces import INTERFACE_VARIABLES, interface_environment, missing_interface


def test_unset_means_the_fabrics_choice():
    assert interface_environment("", {}, {}) == {}
    assert missing_interface("", [], "h") is None


def test_a_name_sets_every_fabrics_variable_but_those_the_user_set():
    assert interface_environment("eth0", {}, {}) == {v: "eth0" for v in INTERFACE_VARIABLES}
    chosen = interface_environment("eth0", {"UCX_NET_DEVICES": "mlx5_0:1"}, {"FI_TCP_IFACE": "ib0"})
    assert chosen == {"FI_SOCKETS_IFACE": "eth0"}


def test_a_missing_interface_is_named_with_the_hosts_own():
    text = missing_interface("eth9", ["lo", "eth0", "eth1"], "node7")
    assert "'eth9'" in text and "node7" in text and "eth0, eth1, lo" in text
    assert missing_interface("eth1", ["lo", "eth0", "eth1"], "node7") is None


@pytest.mark.parametrize("bad", ["eth 0", "a/b", "x" * 16, "a,b"])
def test_bad_names_are_refused_by_the_settings(bad):
    with pytest.raises(ConfigError, match="network_interface"):
        load_settings({}, network_interface=bad)


def test_the_setting_reads_its_variable():
    assert load_settings({"SPARKMPI_NETWORK_INTERFACE": "eth0"}).network_interface == "eth0"
    assert load_settings({"SPARKMPI_HOST_TIMEOUT": "3.5"}).host_timeout == 3.5
    with pytest.raises(ConfigError, match="host_timeout"):
        load_settings({}, host_timeout=0)
