"""Two "nodes" on this machine, each its own launcher and working directory, started through
scripts/launch/: scripts/train.py with SP = 2 across the node boundary (one process per node) must give
exactly the losses of one node running 2 processes; where permitted, also two network namespaces joined by
a veth pair as two hosts with their own addresses. Also: what the scripts hand to every node (the
pdsh env file through DeepSpeed's own export code) and their errors for bad arguments."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nonlocal_dist.testing import free_port

pytest.importorskip("deepspeed")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "scripts" / "launch"
TRAIN_ARGS = ["--run-dir", ".", "--ckpt-dir", "ckpt", "--train-clips", "96", "--test-clips", "32", "--steps", "3",
              "--quiet", "--wandb", "disabled"]
TIMEOUT = 180  # seconds for one launch, all its nodes together
RESULT = "nonlocal-sp2-zero2.json"


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    # The launch scripts run in this interpreter's environment (the torch under test), not the default .venv.
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "NONLOCAL_VENV": sys.prefix, **extra}


def _launch_nodes(tmp: Path, node_cmds: list[list[str]], env: dict | None = None, node_env: list[dict] | None = None) -> list[str]:
    """Start one command per node, each in ``tmp/node<i>`` (its own working directory), concurrently; wait for
    all of them; return their outputs. A failure or a hang fails the test with every node's output tail."""
    procs, logs = [], []
    for i, cmd in enumerate(node_cmds):
        cwd = tmp / f"node{i}"
        cwd.mkdir()
        logs.append(cwd / "launcher.log")
        with logs[-1].open("w") as log:  # a file, not a pipe: a node blocked on a full pipe would hang the other
            procs.append(subprocess.Popen(cmd, cwd=cwd, env={**(env or _env()), **(node_env[i] if node_env else {})},
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline, hung = time.monotonic() + TIMEOUT, False
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = True
            break
    if hung:
        for proc in procs:  # the launchers pass SIGTERM on to their ranks
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    outputs = [log.read_text() for log in logs]
    if hung or any(proc.returncode for proc in procs):
        tails = "\n".join(f"--- node {i}: exit {p.returncode} ---\n{out[-3000:]}" for i, (p, out) in enumerate(zip(procs, outputs)))
        pytest.fail(("hung for %d s" % TIMEOUT if hung else "a launcher failed") + ":\n" + tails)
    return outputs


def _losses(tmp: Path) -> list[float]:
    """The loss history rank 0 wrote, on whichever node it ran."""
    results = sorted(tmp.glob(f"node*/{RESULT}"))
    assert len(results) == 1, results
    result = json.loads(results[0].read_text())
    assert result["finished"] and [h["step"] for h in result["history"]] == [1, 2, 3]
    return [h["loss"] for h in result["history"]]


def _script(name: str, *args: str) -> list[str]:
    return ["bash", str(LAUNCH / name), *args]


@pytest.fixture(scope="module")
def one_node_losses(tmp_path_factory) -> list[float]:
    """The reference: one node, 2 processes, SP = 2 (torchrun --standalone)."""
    tmp = tmp_path_factory.mktemp("one_node")
    out, = _launch_nodes(tmp, [_script("torchrun.sh", "--procs-per-node", "2", "--sp-size", "2", "--", *TRAIN_ARGS)])
    assert "torchrun --nproc_per_node 2 --standalone" in out
    return _losses(tmp)


def test_deepspeed_one_node_matches(tmp_path, one_node_losses):
    out, = _launch_nodes(tmp_path, [_script("deepspeed.sh", "--procs-per-node", "2", "--sp-size", "2",
                                            "--master-port", str(free_port()), "--", *TRAIN_ARGS)])
    assert "--num_gpus 2" in out
    assert _losses(tmp_path) == one_node_losses


def test_torchrun_c10d_rendezvous_two_nodes(tmp_path, one_node_losses):
    """Two torchrun agents join one c10d rendezvous on 127.0.0.1; their variables come from a shared env file."""
    env_file = tmp_path / "run.env"
    subprocess.run(_script("write_env.sh", str(env_file)), env=_env(WANDB_RUN_GROUP="two nodes"), check=True)
    port = str(free_port())
    cmd = _script("torchrun.sh", "--hosts", "127.0.0.1,127.0.0.1", "--procs-per-node", "1", "--sp-size", "2",
                  "--master-port", port, "--env-file", str(env_file), "--", *TRAIN_ARGS)
    outputs = _launch_nodes(tmp_path, [cmd, cmd])
    for out in outputs:
        assert f"--nnodes 2 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:{port}" in out
        assert "WANDB_RUN_GROUP" in out.split("exported from", 1)[1].splitlines()[0]
    assert _losses(tmp_path) == one_node_losses


def test_deepspeed_no_ssh_two_nodes(tmp_path, one_node_losses):
    """Two DeepSpeed launchers on one hostfile, --no_ssh, node ranks 0 and 1."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes, one process each\nnode0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    cmds = [_script("deepspeed.sh", "--hostfile", str(hostfile), "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                    "--master-port", port, "--sp-size", "2", "--", *TRAIN_ARGS) for rank in (0, 1)]
    outputs = _launch_nodes(tmp_path, cmds)
    for rank, out in enumerate(outputs):
        assert f"--no_ssh --node_rank {rank}" in out
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in out
    assert _losses(tmp_path) == one_node_losses


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: hosts 10.77.0.1 and 10.77.0.2, each with interface nl0
    and its own loopback. Yields the command prefixes that run inside each. Skipped where not permitted."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) here")
    names = [f"nl{os.getpid()}{side}" for side in "ab"]
    setup = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
             ["ip", "link", "add", f"{names[0]}v", "type", "veth", "peer", "name", f"{names[1]}v"]]
    for i, name in enumerate(names):
        setup += [["ip", "link", "set", f"{name}v", "netns", name], ["ip", "-n", name, "link", "set", f"{name}v", "name", "nl0"],
                  ["ip", "-n", name, "addr", "add", f"10.77.0.{i + 1}/24", "dev", "nl0"],
                  ["ip", "-n", name, "link", "set", "nl0", "up"], ["ip", "-n", name, "link", "set", "lo", "up"]]
    try:
        for step in setup:
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode:
                pytest.skip(f"no network namespaces here: {' '.join(step)}: {proc.stderr.strip()}")
        yield [["ip", "netns", "exec", name] for name in names]
    finally:
        for name in names:  # the veth pair goes with its namespaces
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_deepspeed_no_ssh_two_hosts_with_own_addresses(tmp_path, one_node_losses, two_hosts):
    """The two DeepSpeed launchers on two network hosts: only the veth link joins them, and gloo reaches the
    other host only through GLOO_SOCKET_IFNAME=nl0 (this machine's hostname resolves to 127.0.0.1), which the
    nodes get from the env file that write_env.sh wrote."""
    env_file = tmp_path / "run.env"
    subprocess.run(_script("write_env.sh", str(env_file)), env=_env(GLOO_SOCKET_IFNAME="nl0"), check=True)
    port = str(free_port())
    cmds = [prefix + _script("deepspeed.sh", "--hosts", "10.77.0.1,10.77.0.2", "--procs-per-node", "1", "--node-rank", str(rank),
                             "--master-port", port, "--env-file", str(env_file), "--sp-size", "2", "--", *TRAIN_ARGS)
            for rank, prefix in enumerate(two_hosts)]
    outputs = _launch_nodes(tmp_path, cmds)
    for rank, out in enumerate(outputs):
        assert f"--master_addr 10.77.0.1 --no_ssh --node_rank {rank}" in out
    assert _losses(tmp_path) == one_node_losses


def test_slurm_tasks_two_nodes(tmp_path, one_node_losses):
    """slurm_task.sh under the variables srun gives one task per node of a 2-node, 1-task-per-node step
    (what slurm.sbatch starts; SLURM itself is not on this machine), with the PATH slurm.sbatch exports."""
    port = str(free_port())
    cmd = _script("slurm_task.sh", sys.executable, "-u", str(ROOT / "scripts/train.py"), "--deepspeed_config",
                  str(ROOT / "configs/ds_zero2.json"), "--sp-size", "2", *TRAIN_ARGS)
    env = _env(SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_NTASKS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    outputs = _launch_nodes(tmp_path, [cmd, cmd], env, [{"SLURM_PROCID": str(i), "SLURM_NODEID": str(i)} for i in (0, 1)])
    for rank, out in enumerate(outputs):
        assert f"rank {rank} of 2, local rank 0, node {rank}, master 127.0.0.1:{port}" in out
    assert _losses(tmp_path) == one_node_losses


def test_pdsh_env_file_survives_deepspeeds_export(tmp_path):
    """The pdsh launch writes .deepspeed_env; DeepSpeed's own PDSHRunner turns it into the 'export ...;'
    prefix of the command every node's shell runs; bash and sh must both get the values back verbatim."""
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import parse_args

    values = {"WANDB_PROJECT": "it's a test", "WANDB_NOTES": 'spaces, $HOME, `uname`, "quotes" and \\', "DEEPSPEED_TIMEOUT": "5",
              "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_script("deepspeed.sh", "--dry-run", "--hosts", "n1,n2", "--procs-per-node", "1", "--sp-size", "2"),
                          cwd=tmp_path, env=_env(**values), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--hostfile .deepspeed_hostfile --master_addr n1 --launcher pdsh" in proc.stdout
    assert (tmp_path / ".deepspeed_hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"
    runner = PDSHRunner(parse_args(["--hostfile", str(tmp_path / ".deepspeed_hostfile"), "train.py"]), "world-info")
    for line in (tmp_path / ".deepspeed_env").read_text().splitlines():  # as deepspeed.launcher.runner.main reads it
        key, val = line.split("=", maxsplit=1)
        runner.add_export(key, val)
    cmd, _, _ = runner.get_cmd(dict(os.environ), {"n1": [0], "n2": [0]})
    exports = next(part for part in cmd if part.startswith("export "))
    for shell in ("bash", "sh"):
        shown = subprocess.run([shell, "-c", exports + " env -0"], env={"PATH": os.environ["PATH"]}, capture_output=True,
                               text=True, check=True).stdout
        got = dict(item.split("=", 1) for item in shown.split("\0") if "=" in item)
        assert {k: got.get(k) for k in values} == values, shell


@pytest.mark.parametrize("args, message", [
    (["deepspeed.sh", "--sp-size", "3"], "--sp-size 3 does not divide the world size 2"),
    (["deepspeed.sh", "--node-rank", "0"], "--node-rank applies to several nodes only"),
    (["deepspeed.sh", "--hosts", "a,b", "--node-rank", "2"], "--node-rank must be 0 to 1"),
    (["deepspeed.sh", "--hosts", "a,b", "--procs-per-node", "2", "--sp-size", "3"], "world size 4 (2 node(s) x 2)"),
    (["deepspeed.sh", "--hostfile", "{tmp}/bad_hostfile"], "'node0 gpus=2' is not 'HOST slots=N'"),
    (["torchrun.sh", "--config", "missing.json"], "--config missing.json: no such file"),
    (["torchrun.sh", "--steps", "3"], "unknown option --steps (train.py's arguments go after --"),
    (["torchrun.sh", "--hostfile", "h"], "unknown option --hostfile"),
    (["torchrun.sh", "--procs-per-node", "0"], "--procs-per-node must be a positive integer, got '0'"),
    (["torchrun.sh", "--rdzv-id", "x"], "--rdzv-id applies to several nodes only (with --hosts)"),
    (["torchrun.sh", "--hosts", "a,,b"], "has an empty name"),
    (["slurm.sbatch"], "not inside a SLURM allocation"),
    (["slurm_task.sh", "true"], "SLURM_PROCID is not set"),
    (["write_env.sh", "{tmp}/.deepspeed_env"], "was not written by this script"),
])
def test_bad_arguments_fail_clearly(tmp_path, args, message):
    (tmp_path / "bad_hostfile").write_text("node0 gpus=2\n")
    (tmp_path / ".deepspeed_env").write_text("HANDWRITTEN=1\n")
    args = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run(_script(*args), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and message in proc.stderr, proc.stdout + proc.stderr
    assert (tmp_path / ".deepspeed_env").read_text() == "HANDWRITTEN=1\n"


@pytest.mark.parametrize("script", ["deepspeed.sh", "torchrun.sh", "slurm.sbatch", "write_env.sh", "slurm_task.sh"])
def test_help(script):
    proc = subprocess.run(_script(script, "--help"), env=_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and ("Options:" in proc.stdout or "usage:" in proc.stdout), proc.stdout + proc.stderr
