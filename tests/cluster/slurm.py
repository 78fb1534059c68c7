"""A one-host Slurm cluster for the tests: Debian's slurmctld/slurmd/munge, a generated slurm.conf
in a temp folder.

Everything lives under the folder it is given (config, munge key and socket, state, logs, pid
files); the daemons are stopped by pid. ``why_not()`` says why a cluster cannot run here (the tests
then skip with that reason).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = "slurmctld slurmd slurm-client munge"
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld",
           "slurmd": "/usr/sbin/slurmd"}


def why_not() -> str | None:
    """None when a cluster can be started, else the reason."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the Slurm tests start slurmctld/slurmd/munged and need root (CI runs as root)"
    missing = [name for name, path in DAEMONS.items() if not os.access(path, os.X_OK)]
    missing += [c for c in ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
                if not shutil.which(c)]
    if missing:
        return (f"Slurm/munge not installed ({', '.join(missing)} missing): as root, "
                f"apt-get install -y --no-install-recommends {PACKAGES}")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for Slurm clients (sbatch, squeue, ...) of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *cmd: str, check: bool = True, env: dict | None = None) -> str:
        p = subprocess.run(list(cmd), env=env or self.env(), capture_output=True, text=True,
                           timeout=60)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p.stdout

    def write_config(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        cpus = os.cpu_count() or 1
        self.conf.write_text("\n".join([
            "ClusterName=tstltest",
            f"SlurmctldHost={self.host}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again (default
            # 120 s)
            f"AuthInfo=socket={self.root}/munge/munge.socket,cred_expire=15",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log",
            f"SlurmdLogFile={self.root}/log/slurmd.log", "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "ReturnToService=2", "MpiDefault=none", "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none", "JobRequeue=1",
            "KillWait=30", "MinJobAge=600", "SchedulerParameters=sched_interval=1",
            f"NodeName={self.host} CPUs={cpus} RealMemory=4000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def start(self) -> None:
        self.write_config()
        m = self.root / "munge"
        subprocess.run([DAEMONS["munged"], "--force", f"--key-file={m}/munge.key",
                        f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
                        f"--log-file={self.root}/log/munged.log", f"--seed-file={m}/munged.seed"],
                       check=True, capture_output=True, timeout=30)
        self.pids["munged"] = self._pid(m / "munged.pid")
        for name in ("slurmctld", "slurmd"):
            subprocess.run([DAEMONS[name], "-f", str(self.conf)], check=True, capture_output=True,
                           timeout=30, env=self.env())
            self.pids[name] = self._pid(self.root / f"{name}.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t", check=False).strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node did not become idle (sinfo: {state!r}); see {self.root}/log")

    @staticmethod
    def _pid(pidfile: Path) -> int:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                return int(pidfile.read_text().strip())
            except (FileNotFoundError, ValueError):
                time.sleep(0.1)
        raise RuntimeError(f"no pid in {pidfile}")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):  # by pid, never by name
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    # ----------------------------------------------------------------------------------------- jobs

    def sbatch(self, *args: str, env: dict | None = None) -> int:
        out = self.run("sbatch", "--parsable", *args, env=env)
        return int(out.strip().split(";")[0])

    def state(self, job: int | str) -> str:
        """The job's state (for an array: every task's, space-separated), '' when Slurm forgot
        it."""
        out = self.run("squeue", "-h", "-j", str(job), "-o", "%T", "--states=all", check=False)
        return " ".join(sorted(set(out.split())))

    def wait(self, job: int | str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state(job)
            if st and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")
                          for s in st.split()):
                return st
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.state(job)!r} after {timeout}s")

    def job_info(self, job: int | str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", str(job))
        return dict(w.split("=", 1) for w in out.split() if "=" in w)
