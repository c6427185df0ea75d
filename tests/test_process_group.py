"""`autoshard.compile` with no process group: it starts one (runtime/world.py) and says so.

Each case runs a fresh interpreter (a process group is per process): no torchrun environment gives a
one-process gloo group; torchrun's four variables (here for a world of one) give the env:// group.
A partial torchrun environment is refused, naming what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

from autoshard.runtime.launch import free_port

SCRIPT = """
import torch, torch.distributed as dist, autoshard
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
class Loss(nn.Module):
    def __init__(self):
        super().__init__(); self.net = model
    def forward(self, x, y):
        return ((self.net(x) - y) ** 2).mean()
m = Loss()
x, y = torch.randn(8, 4), torch.randn(8, 1)
want = m(x, y).item()
compiled = autoshard.compile(m, (x, y))
print("LOSS", compiled.step(x, y), want, dist.get_world_size(), dist.get_backend())
"""


def run(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-c", SCRIPT], env={**clean, **env}, capture_output=True, text=True, timeout=300)


def loss_line(out: str) -> list[str]:
    return next(line.split()[1:] for line in out.splitlines() if line.startswith("LOSS"))


def test_without_torchrun_a_one_process_group_is_started_and_named() -> None:
    done = run({})
    assert done.returncode == 0, done.stderr[-2000:]
    got, want, world, backend = loss_line(done.stdout)
    assert abs(float(got) - float(want)) < 1e-6 and world == "1" and backend == "gloo"
    assert "initialised the default process group (gloo, 1 ranks" in done.stderr
    assert "for this one process" in done.stderr


def test_torchruns_environment_starts_the_group_from_it() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0"}
    done = run(env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "from torchrun's environment" in done.stderr


def test_a_partial_torchrun_environment_is_refused_naming_what_is_missing() -> None:
    done = run({"RANK": "0", "WORLD_SIZE": "2"})
    assert done.returncode != 0
    assert "without MASTER_ADDR, MASTER_PORT" in done.stderr
