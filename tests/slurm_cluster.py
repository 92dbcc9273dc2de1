"""A real one-node Slurm on localhost for tests that submit jobs: munged, slurmctld and slurmd.

The daemons come from Debian's `slurm-wlm` and `munge` packages (installed with apt when they
are missing and we are root) and run in the foreground as our children, with a generated
slurm.conf, their own munge key, state, logs and free ports in one temp directory, so they
touch no system Slurm and stop with the test session. Clients find this cluster through
`SLURM_CONF` in `SlurmCluster.env`.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import apt_install

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch"]
# A requeued job waits cred_expire + 1 s before it may start again (120 s by default).
CRED_EXPIRE_S = 10
# CPUs the node claims (SlurmdParameters=config_overrides lets it claim more than the machine has).
NODE_CPUS = 4


def missing_daemons() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]


def install_packages() -> str | None:
    """apt-get install the packages once per machine; returns why not when it cannot."""
    return apt_install(PACKAGES, lambda: not missing_daemons())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_name() -> str:
    """This machine's short host name when it resolves (as a real cluster's node names do: srun
    jobs find their rendezvous host in the node list), else "localhost"."""
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        return "localhost"


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.node = node_name()
        self._procs: list[subprocess.Popen] = []
        self._logs: list = []

    def _write_conf(self) -> None:
        munge = self.root / "munge"
        host = socket.gethostname().split(".")[0]
        settings = {
            "ClusterName": "hpctraintest",
            "SlurmctldHost": f"{host}(127.0.0.1)",
            "SlurmctldPort": _free_port(), "SlurmdPort": _free_port(),
            "SlurmUser": "root", "SlurmdUser": "root",
            "AuthType": "auth/munge", "CredType": "cred/munge", "AuthInfo": f"socket={munge / 'munge.socket'},cred_expire={CRED_EXPIRE_S}",
            "StateSaveLocation": self.root / "state", "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": self.root / "slurmctld.pid", "SlurmdPidFile": self.root / "slurmd.pid",
            "SlurmctldLogFile": self.root / "slurmctld.log", "SlurmdLogFile": self.root / "slurmd.log",
            "TmpFS": self.root / "tmp",       # PMIx's per-step directories: none left behind in /tmp
            # No cgroups, accounting or systemd: plain processes, as in a container.
            "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none", "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none", "SchedulerType": "sched/builtin",
            "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core",
            "MpiDefault": "none", "ReturnToService": 2, "SlurmdParameters": "config_overrides",
        }
        lines = [f"{k}={v}" for k, v in settings.items()]
        lines += [f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory=1000 State=UNKNOWN",
                  "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, *command: str) -> None:
        log = open(self.root / f"{Path(command[0]).name}.console", "w")
        self._logs.append(log)
        self._procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def start(self, timeout: float = 30) -> None:
        munge = self.root / "munge"
        for d in (munge, self.root / "state", self.root / "spool", self.root / "tmp"):
            d.mkdir(parents=True)
        munge.chmod(0o755)  # munged wants its socket directory traversable by all
        key = munge / "munge.key"
        subprocess.run([_sbin("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        self._write_conf()
        self._spawn(_sbin("munged"), "--foreground", "--force", f"--key-file={key}",
                    f"--socket={munge / 'munge.socket'}", f"--pid-file={munge / 'munged.pid'}",
                    f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}")
        self._wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged to open its socket")
        self._spawn(_sbin("slurmctld"), "-D", "-f", str(self.conf))
        self._spawn(_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.node)
        self._wait_for(lambda: self.command("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", timeout,
                       "the node to come up idle")

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self._procs):
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log*"))
                                 + sorted(self.root.glob("*.console")))
                raise RuntimeError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.3)

    def command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30)

    def job_state(self, job_id: str) -> str:
        out = self.command("scontrol", "show", "job", "-o", job_id).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get("JobState", "UNKNOWN")

    def wait_job(self, job_id: str, timeout: float = 240) -> str:
        """Poll until the job leaves the queue; its final state (COMPLETED, FAILED, ...)."""
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job_id)) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"):
            if time.monotonic() > deadline:
                self.command("scancel", job_id)
                return f"TIMEOUT (still {state} after {timeout:.0f} s)"
            time.sleep(1)
        return state

    def stop(self) -> None:
        if self._procs:
            self.command("scancel", "--full", f"--user={os.getuid()}")  # only this cluster's jobs (SLURM_CONF)
        for proc in reversed(self._procs):
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
