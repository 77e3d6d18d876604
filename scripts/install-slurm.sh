#!/bin/sh
# Install Debian's SLURM (slurmctld, slurmd, sbatch/srun) and munge, for the
# SLURM test on the simulated hosts (tests/test_slurm.py).  Idempotent: does
# nothing when they are there.  Needs root (CI runs as root) only when
# something is missing.  The daemons are not started here: the test starts
# its own, with its own configuration, and stops them.
set -eu

PACKAGES="slurmctld slurmd slurm-client munge"

missing=""
for pkg in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done
if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-slurm.sh: missing packages:$missing; run this script as root (or: sudo apt-get install -y$missing)" >&2
    exit 1
fi
echo "install-slurm.sh: installing$missing with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
# Debian starts the daemons it installs; no init system here, and the test starts its own.
policy=/usr/sbin/policy-rc.d
had_policy=0
[ -e "$policy" ] && had_policy=1
if [ "$had_policy" -eq 0 ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
fi
apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing
[ "$had_policy" -eq 1 ] || rm -f "$policy"
for tool in slurmctld slurmd sbatch srun munged; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        echo "install-slurm.sh: $tool still missing after apt-get install" >&2
        exit 1
    fi
done
