"""The testbed's plan: names, addresses, commands and teardown order, without running anything."""

import ipaddress

import pytest

from sparkmpi.errors import InvalidArgument, InvalidArgumentType
from sparkmpi.launch import testbed_plan
from sparkmpi.launch.testbed_plan import (IFNAME_MAX, PREFIX, Plan, host_wrapper, launcher_script, plan,
                                          subnets_in_use)

BENCHMARK_RANGE = ipaddress.ip_network("198.18.0.0/15")


def test_names_and_addresses_of_three_hosts():
    p = plan("ab1", 3)
    assert p.bridge == "smpi-ab1-br" and p.bridge_address == "198.18.1.1"
    assert [h.namespace for h in p.hosts] == ["smpi-ab1-h1", "smpi-ab1-h2", "smpi-ab1-h3"]
    assert [h.hostname for h in p.hosts] == ["smpi-ab1-host1", "smpi-ab1-host2", "smpi-ab1-host3"]
    assert [h.address for h in p.hosts] == ["198.18.1.2", "198.18.1.3", "198.18.1.4"]
    assert len({h.veth for h in p.hosts}) == 3
    every = [p.bridge_address] + [h.address for h in p.hosts] + [h.second_address for h in p.hosts]
    assert len(set(every)) == len(every)
    assert all(ipaddress.ip_address(a) in BENCHMARK_RANGE for a in every)
    # The second interface is on another subnet than the bridge's: not routed to anyone.
    assert all(not h.second_address.startswith("198.18.1.") for h in p.hosts)
    assert all(n.startswith(PREFIX) and len(n) <= IFNAME_MAX for n in p.names())


def test_largest_plan_keeps_interface_names_within_the_kernel_limit():
    p = plan("zzzzz", testbed_plan.MAX_HOSTS)
    assert max(len(n) for n in p.names()) <= IFNAME_MAX
    assert p.hosts[-1].address == f"198.18.1.{testbed_plan.MAX_HOSTS + 1}"


def test_subnet_skips_those_in_use():
    assert plan("a", 1, {1, 2, 4}).subnet == 3
    assert plan("a", 1, {1, 2, 4}).hosts[0].address == "198.18.3.2"
    with pytest.raises(InvalidArgument, match="every 198.18"):
        plan("a", 1, set(range(1, 255)))


def test_subnets_in_use_reads_ip_addr_output():
    text = ("2: eth0    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\n"
            "7: smpi-x-br    inet 198.18.7.1/24 scope global smpi-x-br\n"
            "9: other    inet 198.18.12.9/16 scope global other\n"
            "9: other    inet 198.19.3.9/24 scope global other\n")
    assert subnets_in_use(text) == {7, 12}


@pytest.mark.parametrize("name", ["", "UPPER", "toolong", "a-b", "a b", None, 5])
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidArgument, match="name"):
        plan(name, 2)


@pytest.mark.parametrize("hosts, error", [(0, InvalidArgument), (17, InvalidArgument), (True, InvalidArgumentType),
                                          (2.0, InvalidArgumentType), ("2", InvalidArgumentType)])
def test_bad_host_counts_are_refused(hosts, error):
    with pytest.raises(error, match="hosts"):
        plan("a", hosts)


def test_up_commands_build_the_bridge_first_then_each_host_in_its_namespace():
    p = plan("u", 2)
    cmds = p.up_commands()
    assert cmds[0] == ["ip", "link", "add", "smpi-u-br", "type", "bridge"]
    assert ["ip", "addr", "add", "198.18.1.1/24", "dev", "smpi-u-br"] in cmds
    for h in p.hosts:
        add_ns = cmds.index(["ip", "netns", "add", h.namespace])
        veth = cmds.index(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0",
                           "netns", h.namespace])
        address = cmds.index(["ip", "-n", h.namespace, "addr", "add", f"{h.address}/24", "dev", "eth0"])
        assert 2 < add_ns < veth < address
        assert ["ip", "link", "set", h.veth, "master", "smpi-u-br"] in cmds
        assert ["ip", "-n", h.namespace, "link", "set", "lo", "up"] in cmds
    # Every command touches only the plan's own objects: no route, no sysctl, no iptables.
    for cmd in cmds:
        assert cmd[0] == "ip" and "route" not in cmd and cmd[1] in ("link", "addr", "netns", "-n")
    assert not any("eth1" in cmd for cmd in cmds)


def test_second_interface_is_a_link_to_nowhere_with_its_own_subnet():
    p = plan("s", 2)
    cmds = p.up_commands(second_interface=True)
    for h in p.hosts:
        assert ["ip", "-n", h.namespace, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-peer"] in cmds
        assert not any(c[-1] == "eth1-peer" and "addr" in c for c in cmds)   # nothing answers there
        assert ["ip", "-n", h.namespace, "addr", "add", f"{h.second_address}/24", "dev", "eth1"] in cmds


def test_down_commands_remove_namespaces_then_links_then_the_bridge():
    p = plan("d", 3)
    cmds = p.down_commands()
    assert cmds[-1] == ["ip", "link", "delete", "smpi-d-br"]
    assert {tuple(c) for c in cmds[:3]} == {("ip", "netns", "delete", h.namespace) for h in p.hosts}
    assert {c[-1] for c in cmds} == p.names()


def test_link_commands_act_on_the_hosts_veth():
    p = plan("l", 2)
    assert p.link_down_command(p.hosts[1]) == ["ip", "link", "set", "smpi-l-v2", "down"]
    assert p.link_up_command(p.hosts[1]) == ["ip", "link", "set", "smpi-l-v2", "up"]


def test_plan_round_trips_through_a_dict():
    p = plan("r", 2)
    assert Plan.from_dict(p.to_dict()) == p


def test_host_wrapper_gives_its_own_hostname_and_dev_shm():
    argv = host_wrapper("smpi-x-host1", ["java", "-cp", "a b"])
    assert argv[0] == "unshare"
    options = argv[1:argv.index("sh")]
    assert {"--uts", "--ipc", "--mount", "--pid", "--fork", "--mount-proc"} <= set(options)
    assert options[options.index("--propagation") + 1] == "private"
    script = argv[argv.index("-c") + 1]
    assert 'hostname "$0"' in script and "mount -t tmpfs" in script and "/dev/shm" in script
    assert script.endswith('exec "$@"')
    assert argv[argv.index("-c") + 2:] == ["smpi-x-host1", "java", "-cp", "a b"]


def test_launcher_script_enters_the_host_of_the_address_hydra_names():
    text = launcher_script({"198.18.1.2": 111, "198.18.1.3": 222})
    assert text.startswith("#!/bin/sh\n")
    assert "198.18.1.2) pid=111 ;;" in text and "198.18.1.3) pid=222 ;;" in text
    assert 'nsenter --target "$pid" --net --uts --ipc --mount --pid sh -c "$*"' in text
    assert "exit 255" in text       # an unknown host fails as ssh does


def test_launcher_script_runs_in_sh(tmp_path):
    import subprocess

    script = tmp_path / "enter.sh"
    # Only the argument handling: nsenter is swapped for echo.
    script.write_text(launcher_script({"198.18.1.2": 111}).replace("exec nsenter", "exec echo nsenter"))
    done = subprocess.run(["sh", str(script), "-x", "-q", "198.18.1.2", "hydra_pmi_proxy", "--control-port", "h:1"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split()[:3] == ["nsenter", "--target", "111"]
    assert done.stdout.strip().endswith("-c hydra_pmi_proxy --control-port h:1")
    unknown = subprocess.run(["sh", str(script), "198.18.9.9", "true"], capture_output=True, text=True)
    assert unknown.returncode == 255 and "no simulated host 198.18.9.9" in unknown.stderr
