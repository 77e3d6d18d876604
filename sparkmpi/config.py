"""One configuration object: the launcher, the PMI server, the FFTs, the broker tooling and the CLI.

Precedence: explicit argument > ``SPARKMPI_*`` environment variable > default.
An unknown ``SPARKMPI_*`` variable or a value that does not parse is an error
naming it, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import ConfigError

ENV_PREFIX = "SPARKMPI_"
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
#: Values of :attr:`Settings.single_host_netmod`.
SINGLE_HOST_NETMODS = ("ofi", "ucx", "")

# Test hooks read where they act (the stream driver), not settings.
_TEST_HOOKS = {"SPARKMPI_TEST_PAUSE_AT"}
# Set by the launcher inside rank processes; never read as settings.
_INTERNAL_PREFIXES = ("SPARKMPI_RANK_", "SPARKMPI_PARENT_")


def _positive_or_none(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if value <= 0:
        raise ConfigError(f"{name} must be > 0 seconds (or unset for no limit), got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    """sparkmpi's settings (each also a ``SPARKMPI_<NAME>`` variable).

    Attributes
    ----------
    pmi_host : str
        Address the driver's PMI server binds to and executors connect to.
        ``"auto"``: 127.0.0.1 for ``local[...]`` masters, otherwise the
        driver host Spark reports (``spark.driver.host``).
    pmi_port : int
        TCP port of the PMI server; 0 picks a free one.
    job_timeout : float or None
        Seconds an MPI job may run, from its first rank's start to the last
        result; None means no limit.
    start_timeout : float
        Seconds to wait for every rank to connect to the PMI server (covers
        executors that are still starting, as on a fresh standalone cluster).
    warm_pool : int
        Spare rank interpreters kept ready (numpy and mpi4py imported, MPI not
        initialised) in each Spark Python worker; 0 starts a fresh interpreter
        per rank per job.  A spare serves exactly one job and is never reused;
        two let back-to-back jobs (micro-batches) always find one that has
        finished its imports while the used one is being replaced.
    kill_grace : float
        Seconds between SIGTERM and SIGKILL when ranks are stopped.
    fork_server : bool
        Fork rank processes from one pre-imported server process per Spark
        Python worker (a few ms each) instead of starting an interpreter per
        rank (about 0.2 s of CPU each).  Turn off if a library in the rank
        cannot live with being forked after import.
    single_host_netmod : str
        MPICH network module for jobs whose ranks all run on one host
        (``MPIR_CVAR_CH4_NETMOD``): ``"ofi"`` (default), ``"ucx"``, or ``""``
        for MPICH's own choice.  Ranks on one host talk through shared memory
        whatever the netmod, but the netmod is still initialised: OFI's takes
        about 8 ms of ``MPI_Init`` and 2 ms of ``MPI_Finalize`` here, UCX's
        16 ms and 5 ms (it probes every network interface and InfiniBand
        library).  Jobs across hosts, and jobs whose ``env`` or environment
        sets ``MPIR_CVAR_CH4_NETMOD``, keep MPICH's choice.
    preload : tuple of str
        Modules the fork server imports once, so the ranks it forks have them
        already (``SPARKMPI_PRELOAD``: comma-separated).  For the modules of
        heavy rank functions: ``sparkmpi.ptycho.spark`` costs a rank about
        0.2 s to import.  The fork server imports them with the executor's
        environment, not the job's ``env``, and only modules that start no
        threads (beyond the fork-safe pools of OpenBLAS and scipy.fft) can be
        preloaded (one that does is refused and the ranks import it
        themselves).  The modules of ``fn`` that belong to
        sparkmpi are preloaded without being listed.  A module may define
        ``_sparkmpi_fork_server_warm_up()`` for once-per-server work, such
        as loading JIT-compiled code (see :mod:`sparkmpi.launch.fork_server`).
    rank_idle_exit_s : float
        A warm spare rank that gets no job within this many seconds exits by itself.
    fft_workers : int
        Threads for scipy.fft on the CPU; 0 (default) uses every core.
    kafka_home : str
        Folder holding Kafka's jars (``lib/``); "" (default) is
        ``~/.cache/sparkmpi/kafka-<version>``.
    verbose : bool
        The CLI shows full tracebacks and every log line on the terminal, as
        ``--verbose`` does.
    world_idle_timeout : float or None
        Seconds a :class:`~sparkmpi.World` may wait for its next call before
        it closes itself and frees its task slots; None keeps it open.
    host_timeout : float
        Seconds a rank's relay may stay silent while the driver waits on its
        world or on an external program's job (``exec``, ``run_program``,
        ``pipe``) (the driver pings each relay every ``host_timeout / 5`` s, at
        most every second) before the job fails with "no contact for N s"
        naming the rank and its host: a host whose link went down, that is
        frozen or powered off.  Without it Spark notices only after its own
        executor timeout (a minute or more).
    network_interface : str
        The network interface the ranks' MPI traffic between hosts uses
        (``eth0``, ``ib0``): sets ``UCX_NET_DEVICES``, ``FI_TCP_IFACE`` and
        ``FI_SOCKETS_IFACE`` for them, unless the job's ``env`` sets them.  ""
        (default) leaves the choice to the fabric, which uses every interface
        with an address and fails where one of them is not routed between the
        hosts.  A host without that interface fails the job at once, naming it.
    """

    pmi_host: str = "auto"
    pmi_port: int = 0
    job_timeout: float | None = None
    start_timeout: float = 120.0
    warm_pool: int = 2
    kill_grace: float = 1.0
    fork_server: bool = True
    single_host_netmod: str = "ofi"
    preload: tuple = ()
    rank_idle_exit_s: float = 900.0
    fft_workers: int = 0
    kafka_home: str = ""
    verbose: bool = False
    world_idle_timeout: float | None = None
    host_timeout: float = 8.0
    network_interface: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.pmi_host, str) or not self.pmi_host:
            raise ConfigError(f"pmi_host must be a non-empty host name or address, got {self.pmi_host!r}")
        if not (0 <= int(self.pmi_port) <= 65535):
            raise ConfigError(f"pmi_port must be in 0..65535, got {self.pmi_port}")
        _positive_or_none("job_timeout", self.job_timeout)
        _positive_or_none("world_idle_timeout", self.world_idle_timeout)
        if (not isinstance(self.network_interface, str) or len(self.network_interface) > 15
                or any(c.isspace() or c in "/," for c in self.network_interface)):
            raise ConfigError(f"network_interface must be an interface name such as 'eth0' (or '' for the "
                              f"fabric's choice), got {self.network_interface!r}")
        if _positive_or_none("host_timeout", self.host_timeout) is None:
            raise ConfigError("host_timeout must be set")
        if _positive_or_none("start_timeout", self.start_timeout) is None:
            raise ConfigError("start_timeout must be set")
        if not (0 <= int(self.warm_pool) <= 64):
            raise ConfigError(f"warm_pool must be in 0..64, got {self.warm_pool}")
        if self.kill_grace < 0:
            raise ConfigError(f"kill_grace must be >= 0 seconds, got {self.kill_grace}")
        if not isinstance(self.fork_server, bool):
            raise ConfigError(f"fork_server must be True or False, got {self.fork_server!r}")
        if isinstance(self.preload, str) or not all(
                isinstance(m, str) and _MODULE_NAME.fullmatch(m) for m in self.preload):
            raise ConfigError(f"preload must be a sequence of dotted module names, got {self.preload!r}")
        object.__setattr__(self, "preload", tuple(self.preload))
        if _positive_or_none("rank_idle_exit_s", self.rank_idle_exit_s) is None:
            raise ConfigError("rank_idle_exit_s must be set")
        if isinstance(self.fft_workers, bool) or not isinstance(self.fft_workers, int) or self.fft_workers < 0:
            raise ConfigError(f"fft_workers must be an integer >= 0 (0: every core), got {self.fft_workers!r}")
        if not isinstance(self.kafka_home, str):
            raise ConfigError(f"kafka_home must be a folder path ('' for the default), got {self.kafka_home!r}")
        if not isinstance(self.verbose, bool):
            raise ConfigError(f"verbose must be True or False, got {self.verbose!r}")
        if self.single_host_netmod not in SINGLE_HOST_NETMODS:
            raise ConfigError(f"single_host_netmod must be one of {SINGLE_HOST_NETMODS} "
                              f"('' keeps MPICH's choice), got {self.single_host_netmod!r}")

    def replace(self, **changes: Any) -> "Settings":
        """Return a copy with ``changes`` applied (validated the same way)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown setting(s) {sorted(unknown)}; known: {[f.name for f in fields(self)]}")
        return dataclasses.replace(self, **changes)


def _parse(name: str, text: str, kind: type | str) -> Any:
    try:
        if kind == "float|None":
            return None if text.strip().lower() in ("", "none", "0") else float(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind == "modules":
            return tuple(m.strip() for m in text.split(",") if m.strip())
        if kind is bool:
            words = {"1": True, "true": True, "yes": True, "on": True,
                     "0": False, "false": False, "no": False, "off": False}
            return words[text.strip().lower()]
        return text
    except (ValueError, KeyError):
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={text!r} is not a valid {kind}") from None


_KINDS = {"pmi_host": str, "pmi_port": int, "job_timeout": "float|None",
          "start_timeout": float, "warm_pool": int, "kill_grace": float,
          "fork_server": bool, "single_host_netmod": str, "preload": "modules",
          "rank_idle_exit_s": float, "fft_workers": int, "kafka_home": str, "verbose": bool,
          "world_idle_timeout": "float|None", "host_timeout": float,
          "network_interface": str}


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from ``overrides`` > ``SPARKMPI_*`` variables > defaults.

    Parameters
    ----------
    environ : mapping, optional
        Environment to read (default ``os.environ``).
    **overrides
        Explicit values; ``None`` means "not given" and falls through.

    Raises
    ------
    ConfigError
        For an unknown ``SPARKMPI_*`` variable or setting, or a bad value.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for key, text in env.items():
        name = key[len(ENV_PREFIX):].lower()
        if (not key.startswith(ENV_PREFIX) or key in _TEST_HOOKS
                or (key.startswith(_INTERNAL_PREFIXES) and name not in _KINDS)):
            continue
        if name not in _KINDS:
            known = ", ".join(ENV_PREFIX + k.upper() for k in _KINDS)
            raise ConfigError(f"unknown environment variable {key}; known settings: {known}")
        values[name] = _parse(name, text, _KINDS[name])
    for name, value in overrides.items():
        if name not in _KINDS:
            raise ConfigError(f"unknown setting {name!r}; known: {sorted(_KINDS)}")
        if value is not None:
            values[name] = value
    return Settings(**values)


def setting(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One setting from its ``SPARKMPI_<NAME>`` variable, else its default; parsed and checked
    as :func:`load_settings` does, without reading the other variables (cheap enough per call).

    Raises
    ------
    ConfigError
        For an unknown name or a bad value.
    """
    if name not in _KINDS:
        raise ConfigError(f"unknown setting {name!r}; known: {sorted(_KINDS)}")
    env = os.environ if environ is None else environ
    text = env.get(ENV_PREFIX + name.upper())
    if text is None:
        return getattr(_DEFAULTS, name)
    return getattr(Settings(**{name: _parse(name, text, _KINDS[name])}), name)


_DEFAULTS = Settings()
