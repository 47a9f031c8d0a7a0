"""Two local processes joined by jax.distributed (CPU, gloo collectives) train like one process.

Each worker process has 2 CPU devices; together they form a (data=1, fsdp=2, tensor=2) mesh, so every
parameter is split across the two processes and every step all-gathers / reduce-scatters between them. Each
process loads only its own rows of the global batch. The result must equal a single-device run on the same
global batches.

The `permuted` variant builds a (data=1, fsdp=4) mesh over the devices interleaved by process ([p0, p1, p0, p1]),
the way a TPU slice's torus order interleaves hosts: each process then holds two non-adjacent blocks of rows,
which the batch assembly must place correctly.

Run a worker by hand: python -m tests.test_multihost PROCESS_ID NUM_PROCESSES PORT OUT_DIR [ordered|permuted]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, SEQ = 3, 8, 16
WORKER_TIMEOUT_S = 150


def _train(mesh_spec: str, devices=None, process_rows: bool = False):
    """STEPS steps of the tiny distillation setup; returns (per-step metrics, final params on host)."""
    import jax

    from boomerang_jax.distill.loss import LossConfig
    from boomerang_jax.distill.optim import TrainConfig
    from boomerang_jax.distill.step import Distiller
    from boomerang_jax.infra import parallel
    from tests.test_step import make_batch, tiny_setup

    cfg, tparams, plan, student = tiny_setup()
    mesh = parallel.make_mesh(mesh_spec, devices)
    d = Distiller(student.config, cfg, plan, mesh,
                  TrainConfig(lr=1e-3, total_steps=10, warmup_steps=1, compute_dtype="float32", remat="full"),
                  LossConfig(chunk=8))
    teacher = d.put_teacher(tparams)
    state = d.init_state(student.params)
    rows = parallel.process_batch_indices(BATCH, mesh) if process_rows else slice(None)
    losses = []
    for i in range(STEPS):
        full = make_batch(i, BATCH, SEQ, cfg.vocab_size, pad_rows=3)
        state, m = d.step(state, teacher, d.put_batch({k: v[rows] for k, v in full.items()}))
        losses.append({k: float(v) for k, v in jax.device_get(m).items()})
    return losses, parallel.to_host(state.params), teacher


def _flat(params) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


MESHES = {"ordered": "data=1,fsdp=2,tensor=2", "permuted": "data=1,fsdp=4,tensor=1"}


def _mesh_devices(mode: str):
    """All devices, in process order, or interleaved by process (p0 d0, p1 d0, p0 d1, p1 d1)."""
    import jax

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if mode == "permuted":
        by_process = [[d for d in devices if d.process_index == p] for p in (0, 1)]
        devices = [d for pair in zip(*by_process) for d in pair]
    return devices


def worker(process_id: int, num_processes: int, port: int, out_dir: str, mode: str = "ordered") -> None:
    """One process of the distributed run (started by the test, or by hand)."""
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_platforms", "cpu")
    from boomerang_jax.infra import parallel

    started = parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=60)
    assert started and jax.process_count() == num_processes and jax.process_index() == process_id
    assert len(jax.devices()) == 2 * num_processes and len(jax.local_devices()) == 2
    devices = _mesh_devices(mode)
    losses, params, teacher = _train(MESHES[mode], devices, process_rows=True)
    from jax.experimental import multihost_utils

    multihost_utils.assert_equal(params, "processes ended with different parameters")
    local_teacher = sum(s.data.nbytes for x in jax.tree.leaves(teacher) for s in x.addressable_shards)
    full_teacher = sum(x.nbytes for x in jax.tree.leaves(teacher))
    mesh = parallel.make_mesh(MESHES[mode], devices)
    rows = parallel.process_batch_indices(BATCH, mesh)
    assert parallel.global_batch_size(len(rows), mesh) == BATCH
    assert parallel.process_data_shard(mesh) == (process_id, 2)
    if parallel.is_main_process():  # only process 0 writes
        np.savez(Path(out_dir) / "params.npz", **_flat(params))
        (Path(out_dir) / "result.json").write_text(json.dumps(dict(losses=losses, rows=[int(r) for r in rows],
                                                   local_teacher=local_teacher, full_teacher=full_teacher)))
    multihost_utils.sync_global_devices("written")
    jax.distributed.shutdown()


@pytest.mark.parametrize("mode", ["ordered", "permuted"])
def test_two_processes_train_like_one(tmp_path, mode):
    from boomerang_jax.infra import parallel

    port = parallel.free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = []
    for i in range(2):
        with open(tmp_path / f"worker{i}.log", "w") as log:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.test_multihost", str(i), "2", str(port), str(tmp_path), mode],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        # the single-process reference runs here meanwhile (1 device, whole batch)
        import jax

        ref_losses, ref_params, _ = _train("data=1", jax.devices()[:1])
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = "\n".join(f"--- worker {i}\n" + (tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))
    assert [p.returncode for p in procs] == [0, 0], out
    # only process 0 wrote, and it wrote everything
    assert sorted(f.name for f in tmp_path.iterdir() if not f.name.endswith(".log")) == ["params.npz", "result.json"]
    result = json.loads((tmp_path / "result.json").read_text())
    # process 0 loaded only its half of the batch: one block, or every other block of the interleaved mesh
    assert result["rows"] == ([0, 1, 2, 3] if mode == "ordered" else [0, 1, 4, 5])
    assert result["local_teacher"] <= result["full_teacher"] / 2 + 512  # the teacher is split across processes
    for step, (a, b) in enumerate(zip(result["losses"], ref_losses)):
        for key in ("loss", "ce", "kl", "cos", "grad_norm", "tokens"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=f"step {step} {key}")
    got, want = np.load(tmp_path / "params.npz"), _flat(ref_params)
    assert sorted(got.files) == sorted(want)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, atol=5e-6, rtol=1e-5, err_msg=name)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:6])
