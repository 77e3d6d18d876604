"""Which network interface MPICH's fabrics use between hosts: the ``network_interface`` setting, pure.

MPICH from the wheel talks between hosts through its UCX netmod by default
(OFI with ``MPIR_CVAR_CH4_NETMOD=ofi``).  Both use every interface that has
an address unless told otherwise; a host with an interface its peers cannot
reach (a second, private network) makes ``MPI_Init`` fail.  Naming the
interface sets the variables of each fabric; a name the host does not have is
refused before MPI starts, with the host's own interfaces listed.
"""

from __future__ import annotations

#: The variables that pick the interface, one per fabric MPICH may use.
INTERFACE_VARIABLES = ("UCX_NET_DEVICES", "FI_TCP_IFACE", "FI_SOCKETS_IFACE")


def interface_environment(name: str, env: dict, environ: dict) -> dict:
    """The variables that make the ranks use interface ``name`` ("" : none), except those the
    job's ``env`` or the executor's ``environ`` already set (the user's choice wins)."""
    if not name:
        return {}
    return {v: name for v in INTERFACE_VARIABLES if v not in env and v not in environ}


def missing_interface(name: str, available: list[str], host: str) -> str | None:
    """Why the ranks on ``host`` cannot use interface ``name`` (None when it is there or unset)."""
    if not name or name in available:
        return None
    return (f"network_interface {name!r} does not exist on host {host} "
            f"(its interfaces: {', '.join(sorted(available)) or 'none'})")
