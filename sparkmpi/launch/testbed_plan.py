"""The plan of a test cluster of simulated hosts on one machine: pure, no I/O.

A host is a Linux network namespace joined to a bridge in the root namespace
by a veth pair; its processes also get their own host name (UTS namespace)
and a private ``/dev/shm`` (a mount namespace with a fresh tmpfs), so MPICH
on two simulated hosts cannot meet through shared memory.  Addresses come
from 198.18.0.0/15, the range reserved for benchmarking (RFC 2544): host
``i`` of subnet ``s`` is ``198.18.s.(i+1)`` and the bridge ``198.18.s.1``.
Each host may get a second, non-routed interface (``eth1``, with an address
in ``198.19.s.0/24`` that nobody else can reach: its veth peer stays inside the
host, with no address), to test that jobs
pick the right interface.

:func:`plan` turns (name, host count, subnets already in use) into a
:class:`Plan`; :meth:`Plan.up_commands` and :meth:`Plan.down_commands` are the
``ip`` commands, in order, that build and remove it.  The adapter
(:mod:`sparkmpi.launch.testbed`) runs them and starts Spark.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import InvalidArgument, InvalidArgumentType

#: Every namespace, link and host name of a testbed starts with this.
PREFIX = "smpi-"
MAX_HOSTS = 16
#: Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
IFNAME_MAX = 15
_NAME = re.compile(r"[a-z0-9]{1,5}")
#: Interface names inside a host namespace.
HOST_IFACE = "eth0"
SECOND_IFACE = "eth1"
SECOND_PEER = "eth1-peer"
NETMASK_BITS = 24


@dataclass(frozen=True)
class Host:
    index: int          # 1-based
    namespace: str      # ip netns name
    hostname: str       # its UTS name
    address: str        # on the bridge's subnet
    veth: str           # the root namespace's end of its veth pair
    second_address: str  # the non-routed interface's address


@dataclass(frozen=True)
class Plan:
    name: str
    subnet: int          # the third octet: 198.18.<subnet>.0/24
    bridge: str
    bridge_address: str
    hosts: tuple

    def up_commands(self, second_interface: bool = False) -> list[list[str]]:
        """``ip`` commands that build the network, in order (the bridge first, then each host)."""
        cmds = [["ip", "link", "add", self.bridge, "type", "bridge"],
                ["ip", "addr", "add", f"{self.bridge_address}/{NETMASK_BITS}", "dev", self.bridge],
                ["ip", "link", "set", self.bridge, "up"]]
        for h in self.hosts:
            ns = ["ip", "-n", h.namespace]
            cmds += [["ip", "netns", "add", h.namespace],
                     ["ip", "link", "add", h.veth, "type", "veth", "peer", "name", HOST_IFACE,
                      "netns", h.namespace],
                     ["ip", "link", "set", h.veth, "master", self.bridge],
                     ["ip", "link", "set", h.veth, "up"],
                     ns + ["link", "set", "lo", "up"],
                     ns + ["addr", "add", f"{h.address}/{NETMASK_BITS}", "dev", HOST_IFACE],
                     ns + ["link", "set", HOST_IFACE, "up"]]
            if second_interface:
                # A veth pair with both ends in the host (dummy links need a kernel module that
                # containers may lack): the peer end has no address, so nothing answers there.
                cmds += [ns + ["link", "add", SECOND_IFACE, "type", "veth", "peer", "name", SECOND_PEER],
                         ns + ["addr", "add", f"{h.second_address}/{NETMASK_BITS}", "dev", SECOND_IFACE],
                         ns + ["link", "set", SECOND_PEER, "up"],
                         ns + ["link", "set", SECOND_IFACE, "up"]]
        return cmds

    def down_commands(self) -> list[list[str]]:
        """Commands that remove the network: each namespace (its veth pair goes with it), then the
        bridge.  Each may fail harmlessly when its object is already gone."""
        return [["ip", "netns", "delete", h.namespace] for h in reversed(self.hosts)] + \
               [["ip", "link", "delete", h.veth] for h in self.hosts] + \
               [["ip", "link", "delete", self.bridge]]

    def link_down_command(self, host: Host) -> list[str]:
        """Cut one host off (its end of the veth in the root namespace goes down)."""
        return ["ip", "link", "set", host.veth, "down"]

    def link_up_command(self, host: Host) -> list[str]:
        return ["ip", "link", "set", host.veth, "up"]

    def names(self) -> set:
        """Every namespace and root-namespace link the plan creates (for leak checks)."""
        return {self.bridge} | {h.namespace for h in self.hosts} | {h.veth for h in self.hosts}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return cls(name=data["name"], subnet=data["subnet"], bridge=data["bridge"],
                   bridge_address=data["bridge_address"],
                   hosts=tuple(Host(**h) for h in data["hosts"]))


#: Namespaces a simulated host has of its own besides the network one.  Not only the UTS name and
#: ``/dev/shm`` (mount): UCX also meets peers through System V shared memory (IPC) and reads their
#: memory with process_vm_readv (CMA, which needs their pids: PID), and would otherwise treat two
#: simulated hosts as one machine.
HOST_NAMESPACES = ("--uts", "--ipc", "--mount", "--pid")


def host_wrapper(hostname: str, argv: list[str], hosts_file: str = "") -> list[str]:
    """``argv`` run as one simulated host's first process: its own UTS name, System V IPC, PID
    numbering (with its own ``/proc``) and a fresh tmpfs on ``/dev/shm``, in a mount namespace whose
    changes stay private (they vanish with its last process, so nothing is left mounted).  Run it
    inside ``ip netns exec NS``; ``unshare`` forks, and its child is the host's process 1.
    ``hosts_file``, if given, is bind-mounted on the host's ``/etc/hosts`` (so the hosts resolve
    each other's names, as SLURM and Spark's defaults need)."""
    script = 'hostname "$0" && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec "$@"'
    if hosts_file:
        script = f'mount --bind "{hosts_file}" /etc/hosts && ' + script
    return ["unshare", *HOST_NAMESPACES, "--fork", "--mount-proc", "--propagation", "private",
            "sh", "-c", script, hostname, *argv]


def hosts_file_text(plan: "Plan", extra: dict | None = None) -> str:
    """``/etc/hosts`` lines naming every host of ``plan`` (and ``extra``: name -> address)."""
    lines = ["127.0.0.1 localhost"] + [f"{h.address} {h.hostname}" for h in plan.hosts]
    lines += [f"{address} {name}" for name, address in sorted((extra or {}).items())]
    return "\n".join(lines) + "\n"


def plan(name: str, hosts: int, subnets_in_use: set | frozenset = frozenset()) -> Plan:
    """The testbed ``name`` with ``hosts`` hosts, on the first 198.18.x.0/24 not in ``subnets_in_use``.

    Parameters
    ----------
    name : str
        1-5 lowercase letters or digits; namespaces are ``smpi-NAME-hI``, the bridge
        ``smpi-NAME-br``, host names ``smpi-NAME-hostI``.
    hosts : int
        1..16.
    subnets_in_use : set of int
        Third octets of 198.18.x.0/24 subnets already on this machine (another testbed's).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(f"name: expected 1-5 lowercase letters or digits, got {name!r}")
    if isinstance(hosts, bool) or not isinstance(hosts, int):
        raise InvalidArgumentType(f"hosts: expected an integer, got {hosts!r}")
    if not 1 <= hosts <= MAX_HOSTS:
        raise InvalidArgument(f"hosts: expected 1..{MAX_HOSTS}, got {hosts}")
    free = [s for s in range(1, 255) if s not in subnets_in_use]
    if not free:
        raise InvalidArgument("subnets_in_use: every 198.18.x.0/24 is taken")
    subnet = free[0]
    base = f"{PREFIX}{name}"
    members = tuple(Host(index=i, namespace=f"{base}-h{i}", hostname=f"{base}-host{i}",
                         address=f"198.18.{subnet}.{i + 1}", veth=f"{base}-v{i}",
                         second_address=f"198.19.{subnet}.{i + 1}")
                    for i in range(1, hosts + 1))
    result = Plan(name=name, subnet=subnet, bridge=f"{base}-br", bridge_address=f"198.18.{subnet}.1",
                  hosts=members)
    assert all(len(n) <= IFNAME_MAX for n in result.names())
    return result


def subnets_in_use(ip_addr_output: str) -> set:
    """Third octets of the 198.18.x.0/24 addresses in ``ip -o -4 addr`` output."""
    return {int(m.group(1)) for m in re.finditer(r"inet 198\.18\.(\d+)\.\d+/", ip_addr_output)}


def launcher_script(host_pids: dict) -> str:
    """A shell script that stands in for ``ssh`` under Hydra (``mpiexec -launcher ssh -launcher-exec``):
    called as ``SCRIPT [options] HOST COMMAND...``, it runs COMMAND inside the simulated host
    ``HOST`` (an address), entering the network, UTS, IPC, mount and PID namespaces of a process living there
    (``host_pids``: address -> the pid of a process inside: the host's process 1), as ssh would
    run it on a real host."""
    cases = "".join(f"  {address}) pid={pid} ;;\n" for address, pid in sorted(host_pids.items()))
    return ("#!/bin/sh\n"
            "# Written by sparkmpi.launch.testbed: Hydra's ssh launcher, into a simulated host.\n"
            'while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done\n'
            'host="$1"; shift\n'
            'case "$host" in\n'
            f"{cases}"
            '  *) echo "testbed launcher: no simulated host $host" >&2; exit 255 ;;\n'
            "esac\n"
            'exec nsenter --target "$pid" --net --uts --ipc --mount --pid sh -c "$*"\n')
